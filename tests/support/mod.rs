//! Helpers shared by the end-to-end tests. Each test binary uses only some of them.
#![allow(dead_code, unreachable_pub)]

pub mod system_manager;
pub mod user_manager;
pub mod wk;
