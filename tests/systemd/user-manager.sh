#!/usr/bin/env bash
# Private systemd *user* manager for watchkeeper's end-to-end tests.
#
# On the project's machines (Debian 12, systemd 252 installed, PID 1 is NOT
# systemd, hybrid cgroups, /run not a mount point, no journald) a user manager
# cannot be had the normal way (user@UID.service, logind, PAM). This script
# builds what it needs by hand; see shared/reference/systemd-on-these-machines.md.
#
#   user-manager.sh check                 exit 0 if this machine can host one
#   user-manager.sh start STATEDIR        set up + start; prints "ready"
#   user-manager.sh run STATEDIR -- CMD…  CMD inside the namespace as the user
#   user-manager.sh stop STATEDIR         stop everything started for STATEDIR
#
# What `start` does (as root):
#   1. installs missing Debian packages (systemd util-linux mount passwd);
#   2. takes a free *slot* (flock on /run/lock/wk-e2e/slot-N.lock, N < WK_E2E_SLOTS)
#      and uses that slot's dedicated user wk-e2e-N (created if missing, regular
#      UID >= 1000 so journald gives it its own journal file, member of
#      systemd-journal); its home is emptied (only if it has the harness marker);
#   3. creates the delegated cgroup user.slice/user-UID.slice/user@UID.service in
#      every systemd-relevant hierarchy (v2 and v1 name=systemd);
#   4. starts a "namespace holder" (a bash in a private mount namespace, it keeps
#      the slot lock) which mounts, privately: `--rbind /run /run`, tmpfs on
#      /run/systemd (with system/ and unit-root/ 0700), tmpfs on /run/user
#      (/run/user/UID 0700), tmpfs on /run/log; then starts systemd-journald
#      (journal files in STATEDIR/journal) and `systemd --user` as the user, both
#      as its own children, so they are reaped at once when they exit;
#   5. polls `systemctl --user is-system-running` (inside the namespace, as the
#      user) until running/degraded, with a deadline;
#   6. if WK_E2E_OWNER_PID is set (the Rust harness sets it to the test process),
#      starts a reaper that runs `stop` when that process dies without stopping
#      the manager (SIGKILL, Ctrl-C, abort), so no manager or slot lock leaks.
# `stop`: SIGTERM to the manager (= `systemctl --user exit`: units are stopped),
# SIGKILL to anything left in its cgroups, rmdir of its cgroups, then journald,
# holder and reaper are ended; all by recorded PID + start time. The namespace
# (and every mount in it) vanishes with its last process.
# Nothing is mounted on the host; the host's /run/systemd is never touched.
#
# STATEDIR files: holder.pid manager.pid journald.pid reaper.pid ("PID STARTTIME"), user,
# uid, gid, home, slot, runtime_dir, cgroups, *.log, journal/, bin/.
#
# Environment knobs: WK_E2E_SLOTS (2), WK_E2E_USER_PREFIX (wk-e2e-),
# WK_E2E_START_TIMEOUT (30 s), WK_E2E_STOP_TIMEOUT (20 s), WK_E2E_SLOT_TIMEOUT
# (600 s), WK_E2E_JOURNALD (1), WK_E2E_LOG_LEVEL (info), WK_E2E_OWNER_PID.
# Without journald (WK_E2E_JOURNALD=0) the 252 manager logs nothing at all: it
# insists on /dev/console, which the user cannot open.
# shellcheck disable=SC2329 # some functions only run through with_setup_lock
set -euo pipefail

PROG=${0##*/}
SELF=$(readlink -f "${BASH_SOURCE[0]}")
SYSTEMD_BIN=/usr/lib/systemd/systemd
JOURNALD_BIN=/usr/lib/systemd/systemd-journald
USER_PREFIX=${WK_E2E_USER_PREFIX:-wk-e2e-}
SLOTS=${WK_E2E_SLOTS:-2}
LOCK_DIR=/run/lock/wk-e2e
MARKER=.wk-e2e-harness
REQUIRED_PKGS=(systemd util-linux mount passwd)
PATH_IN_NS=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin

log() { echo "$PROG: $*" >&2; }
die() { echo "$PROG: error: $*" >&2; exit 1; }
now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }
need_root() { [[ $EUID -eq 0 ]] || die "'$1' needs root (running as uid $EUID)"; }

# --- processes, identified by PID + start time (so a reused PID is never hit) ---
proc_field() { # PID FIELD(1-based, after the comm field: 1 = state, 20 = starttime)
    local stat rest idx=$2 fields
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    rest=${stat##*) }
    read -r -a fields <<<"$rest"
    [[ -n ${fields[idx - 1]:-} ]] || return 1
    echo "${fields[idx - 1]}"
}
proc_id() { echo "$1 $(proc_field "$1" 20)"; }
# alive FILE: true if the process recorded in FILE is still running (not a zombie)
alive() {
    local f=$1 pid st
    [[ -s $f ]] || return 1
    read -r pid st <"$f" || return 1
    [[ -n $pid && -d /proc/$pid ]] || return 1
    [[ "$(proc_field "$pid" 20 || true)" == "$st" ]] || return 1
    [[ "$(proc_field "$pid" 1 || true)" != Z ]]
}
pid_of() { local pid _; read -r pid _ <"$1"; echo "$pid"; }
# wait_gone FILE TIMEOUT_MS: poll until the process in FILE is gone
wait_gone() {
    local deadline=$(($(now_ms) + $2))
    while alive "$1"; do
        (($(now_ms) < deadline)) || return 1
        sleep 0.02
    done
}
# terminate FILE NAME TIMEOUT_MS: SIGTERM, wait, then SIGKILL
terminate() {
    local f=$1 name=$2 t=$3
    alive "$f" || return 0
    kill -TERM "$(pid_of "$f")" 2>/dev/null || true
    if ! wait_gone "$f" "$t"; then
        log "$name (PID $(pid_of "$f")) still running after ${t} ms: SIGKILL"
        kill -KILL "$(pid_of "$f")" 2>/dev/null || true
        wait_gone "$f" 5000 || log "warning: $name (PID $(pid_of "$f")) survived SIGKILL"
    fi
}

# --- cgroups ---
# The hierarchies systemd uses: v2 (unified or hybrid) and v1 name=systemd.
cgroup_roots() {
    local t
    t=$(stat -fc %T /sys/fs/cgroup 2>/dev/null || true)
    if [[ $t == cgroup2fs ]]; then
        echo /sys/fs/cgroup
    elif [[ $t == tmpfs ]]; then
        [[ -d /sys/fs/cgroup/unified && $(stat -fc %T /sys/fs/cgroup/unified) == cgroup2fs ]] \
            && echo /sys/fs/cgroup/unified
        [[ -d /sys/fs/cgroup/systemd && $(stat -fc %T /sys/fs/cgroup/systemd) == cgroupfs ]] \
            && echo /sys/fs/cgroup/systemd
    fi
    return 0
}
delegate_files() { # ROOT
    if [[ $(stat -fc %T "$1") == cgroup2fs ]]; then
        if [[ -r /sys/kernel/cgroup/delegate ]]; then cat /sys/kernel/cgroup/delegate
        else printf '%s\n' cgroup.procs cgroup.threads cgroup.subtree_control; fi
    else
        printf '%s\n' cgroup.procs tasks cgroup.clone_children notify_on_release
    fi
}
# PIDs in a cgroup subtree (one per line)
cgroup_pids() {
    [[ -d $1 ]] || return 0
    find "$1" -name cgroup.procs -exec cat {} + 2>/dev/null || true
}
# kill_cgroup_tree DIR...: SIGKILL every process left in the subtrees (all of
# them were started by the manager of this slot), wait until they are empty.
kill_cgroup_tree() {
    local deadline=$(($(now_ms) + 10000)) pids
    while :; do
        pids=$(for d in "$@"; do cgroup_pids "$d"; done | sort -u | tr '\n' ' ')
        pids=${pids% }
        [[ -z $pids ]] && return 0
        if (($(now_ms) > deadline)); then
            log "warning: processes left in the manager's cgroup after 10 s: $pids"
            return 1
        fi
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        sleep 0.02
    done
}
# rmdir_tree DIR: remove DIR and its sub-cgroups, deepest first, with retries
rmdir_tree() {
    local d=$1 deadline=$(($(now_ms) + 5000))
    [[ -d $d ]] || return 0
    while :; do
        find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
        [[ -d $d ]] || return 0
        if (($(now_ms) > deadline)); then
            log "warning: could not remove cgroup $d: $(find "$d" -depth -type d | head -3 | tr '\n' ' ')"
            return 1
        fi
        sleep 0.05
    done
}

# --- host setup (packages, users), serialized by a global lock ---
with_setup_lock() {
    mkdir -p "$LOCK_DIR"
    local fd
    exec {fd}>>"$LOCK_DIR/setup.lock"
    flock -w 900 "$fd" || die "timed out waiting for $LOCK_DIR/setup.lock"
    local rc=0
    "$@" || rc=$?
    exec {fd}>&-
    return $rc
}
ensure_packages() {
    local missing=() p
    if command -v dpkg-query >/dev/null; then
        for p in "${REQUIRED_PKGS[@]}"; do
            dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
                || missing+=("$p")
        done
    fi
    if ((${#missing[@]})); then
        log "installing missing packages: ${missing[*]}"
        apt-get update -qq >&2 || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
    fi
    for p in "$SYSTEMD_BIN" unshare nsenter setpriv flock mount useradd systemctl; do
        command -v "$p" >/dev/null || die "'$p' not found after installing ${REQUIRED_PKGS[*]}"
    done
}
ensure_user() { # NAME
    local name=$1 home
    if ! getent passwd "$name" >/dev/null; then
        # A regular (non-system) UID: journald only gives UIDs >= 1000 their own
        # journal file, which `journalctl --user` reads.
        useradd --create-home --user-group --shell /usr/sbin/nologin \
            --comment "watchkeeper e2e tests (tests/systemd/user-manager.sh)" "$name" \
            || die "useradd $name failed"
        home=$(getent passwd "$name" | cut -d: -f6)
        touch "$home/$MARKER"
        log "created user $name (uid $(id -u "$name"), home $home)"
    fi
    home=$(getent passwd "$name" | cut -d: -f6)
    [[ -e $home/$MARKER ]] || die "user $name exists but its home $home lacks $MARKER:" \
        "it was not created by this harness, refusing to use it (set WK_E2E_USER_PREFIX)"
    if getent group systemd-journal >/dev/null && ! id -nG "$name" | tr ' ' '\n' | grep -qx systemd-journal; then
        usermod -aG systemd-journal "$name" || die "usermod -aG systemd-journal $name failed"
    fi
}
make_cgroups() { # UID USER GID
    local root d f
    for root in $(cgroup_roots); do
        d=$root/user.slice/user-$1.slice/user@$1.service
        mkdir -p "$d" || die "mkdir $d failed"
        chown "$1:$3" "$d"
        for f in $(delegate_files "$root"); do
            [[ -e $d/$f ]] && chown "$1:$3" "$d/$f"
        done
    done
}
rmdir_shared_parents() {
    local root
    for root in $(cgroup_roots); do
        rmdir "$root/user.slice" 2>/dev/null || true
    done
}

# --- slots: one dedicated user per slot, one manager per slot at a time ---
SLOT='' SLOT_FD=''
acquire_slot() { # STATEDIR
    local deadline=$(($(now_ms) + ${WK_E2E_SLOT_TIMEOUT:-600} * 1000)) n fd
    mkdir -p "$LOCK_DIR"
    while :; do
        for ((n = 0; n < SLOTS; n++)); do
            exec {fd}>>"$LOCK_DIR/slot-$n.lock"
            if flock -n "$fd"; then
                SLOT=$n SLOT_FD=$fd
                echo "$1 (start pid $$)" >"$LOCK_DIR/slot-$n.owner"
                return 0
            fi
            exec {fd}>&-
        done
        if (($(now_ms) > deadline)); then
            die "all $SLOTS slots are busy after ${WK_E2E_SLOT_TIMEOUT:-600} s (owners: $(cat "$LOCK_DIR"/slot-*.owner 2>/dev/null | tr '\n' ';'))"
        fi
        sleep 0.2
    done
}

# --- state ---
load_state() { # STATEDIR
    SD=$1
    [[ -s $SD/uid ]] || return 1
    S_USER=$(<"$SD/user") S_UID=$(<"$SD/uid") S_GID=$(<"$SD/gid") S_HOME=$(<"$SD/home")
    S_RUNTIME=/run/user/$S_UID
}

# exec_in_ns STATEDIR CMD...: as the user, inside the manager's mount namespace
in_ns_cmd() {
    local extra=()
    [[ -n ${TERM:-} ]] && extra+=("TERM=$TERM")
    NS_CMD=(nsenter -t "$(pid_of "$SD/holder.pid")" -m --wd="$S_HOME" --
        setpriv --reuid="$S_UID" --regid="$S_GID" --init-groups --
        env -i HOME="$S_HOME" USER="$S_USER" LOGNAME="$S_USER" SHELL=/bin/sh
        PATH="$PATH_IN_NS" XDG_RUNTIME_DIR="$S_RUNTIME" LANG=C.UTF-8 "${extra[@]}")
}

cmd_run() {
    need_root run
    [[ $# -ge 1 ]] || die "usage: $PROG run STATEDIR -- CMD..."
    local sd
    sd=$(realpath -m "$1"); shift
    [[ ${1:-} == -- ]] && shift
    [[ $# -ge 1 ]] || die "run: no command given"
    load_state "$sd" || die "run: $sd is not a started state dir (no $sd/uid)"
    alive "$SD/holder.pid" || die "run: the namespace holder of $sd is not running (stopped or crashed; see $sd/holder.log)"
    in_ns_cmd
    exec "${NS_CMD[@]}" "$@"
}

# --- the namespace holder (runs inside `unshare -m`, as root) ---
cmd_holder() {
    local sd=$1 lock_fd=${WK_E2E_LOCK_FD:?}
    load_state "$sd" || die "holder: no state in $sd"
    proc_id "$BASHPID" >"$sd/holder.pid.tmp" && mv "$sd/holder.pid.tmp" "$sd/holder.pid"
    # On an early failure, take down what was started (globals: the trap runs
    # after this function has returned).
    trap '[[ -n ${H_MPID:-} ]] && kill -KILL "$H_MPID" 2>/dev/null; [[ -n ${H_JPID:-} ]] && kill -TERM "$H_JPID" 2>/dev/null; true' EXIT
    log "holder $BASHPID: mount namespace $(readlink /proc/self/ns/mnt)"

    # libmount's utab would otherwise be written to the host's /run/mount.
    export LIBMOUNT_UTAB=$sd/utab
    # /run must be a mount point, or units with MountAPIVFS get a fresh /run.
    mountpoint -q /run || mount --rbind /run /run
    mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run/systemd
    mkdir -m 0755 /run/systemd/system        # sd_booted() in this namespace only
    mkdir -m 0700 /run/systemd/unit-root     # PrivateUsers= + mount namespacing
    # A unit with LoadCredential=/SetCredential= and a mount namespace bind-mounts its
    # credentials below /run/credentials, which must exist (a booted system has it: PID 1
    # creates it for the first unit with credentials). Without it the unit fails with
    # 226/NAMESPACE "/run/systemd/unit-root/run/credentials: No such file or directory".
    # An empty root-owned directory, created only where it is missing; nothing is mounted.
    [[ -d /run/credentials ]] || mkdir -m 0755 /run/credentials
    mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run/user
    mkdir -m 0700 "$S_RUNTIME"
    chown "$S_UID:$S_GID" "$S_RUNTIME"

    local target=console
    if [[ ${WK_E2E_JOURNALD:-1} != 0 && -x $JOURNALD_BIN && -s /etc/machine-id ]]; then
        local jdir=$sd/journal storage
        mkdir -p "$jdir"
        getent group systemd-journal >/dev/null && chgrp systemd-journal "$jdir"
        chmod 2755 "$jdir"
        mount -t tmpfs -o mode=0755,nosuid,nodev,size=64m tmpfs /run/log
        if [[ -d /var/log/journal ]]; then
            mount --bind "$jdir" /var/log/journal
            storage=persistent
        else
            mkdir -p /run/log/journal
            mount --bind "$jdir" /run/log/journal
            storage=volatile
        fi
        mkdir -p /run/systemd/journald.conf.d
        cat >/run/systemd/journald.conf.d/wk-e2e.conf <<EOF
[Journal]
Storage=$storage
SplitMode=uid
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
ReadKMsg=no
Audit=no
RateLimitIntervalSec=0
SystemMaxUse=64M
RuntimeMaxUse=32M
EOF
        env -i PATH="$PATH_IN_NS" LANG=C.UTF-8 "$JOURNALD_BIN" \
            {lock_fd}>&- </dev/null >>"$sd/journald.log" 2>&1 &
        H_JPID=$!
        proc_id "$H_JPID" >"$sd/journald.pid"
        local deadline=$(($(now_ms) + 10000))
        until [[ -S /run/systemd/journal/socket ]]; do
            kill -0 "$H_JPID" 2>/dev/null || die "systemd-journald exited at start (see $sd/journald.log)"
            (($(now_ms) < deadline)) || die "systemd-journald: no /run/systemd/journal/socket after 10 s"
            sleep 0.01
        done
        if [[ $storage == persistent ]]; then
            timeout 10 journalctl --flush || log "warning: journalctl --flush failed"
        fi
        target=journal
        log "journald $H_JPID: $storage storage in $jdir"
    else
        log "journald not started (WK_E2E_JOURNALD=${WK_E2E_JOURNALD:-1}, machine-id/binary missing?): the manager logs nowhere"
    fi

    local cg=() root
    for root in $(cgroup_roots); do
        cg+=("$root/user.slice/user-$S_UID.slice/user@$S_UID.service/cgroup.procs")
    done
    (
        for f in "${cg[@]}"; do echo "$BASHPID" >"$f"; done
        exec setpriv --reuid="$S_UID" --regid="$S_GID" --init-groups -- \
            env -i HOME="$S_HOME" USER="$S_USER" LOGNAME="$S_USER" SHELL=/bin/sh \
            PATH="$PATH_IN_NS" XDG_RUNTIME_DIR="$S_RUNTIME" LANG=C.UTF-8 \
            "$SYSTEMD_BIN" --user --log-target="$target" --log-level="${WK_E2E_LOG_LEVEL:-info}"
    ) {lock_fd}>&- </dev/null >>"$sd/manager.log" 2>&1 &
    H_MPID=$!
    proc_id "$H_MPID" >"$sd/manager.pid"
    log "manager $H_MPID started as $S_USER"

    local rc=0
    wait "$H_MPID" || rc=$?
    H_MPID=
    echo "$rc" >"$sd/manager.exit"
    log "manager exited with status $rc"
    # Stay until journald is stopped too (stop does that), keeping the namespace.
    if [[ -n ${H_JPID:-} ]]; then wait "$H_JPID" || true; H_JPID=; fi
    log "holder exiting"
}

# --- start ---
cmd_start() {
    need_root start
    [[ $# -eq 1 ]] || die "usage: $PROG start STATEDIR"
    local sd t0 deadline state=
    t0=$(now_ms)
    sd=$(realpath -m "$1")
    mkdir -p "$sd/bin"
    [[ -e $sd/holder.pid ]] && die "$sd was already used for a manager (holder.pid exists); use a fresh STATEDIR"
    chmod 0755 "$sd" "$sd/bin"

    with_setup_lock ensure_packages
    acquire_slot "$sd"
    local user=$USER_PREFIX$SLOT
    with_setup_lock ensure_user "$user"
    local uid gid home
    uid=$(id -u "$user") gid=$(id -g "$user") home=$(getent passwd "$user" | cut -d: -f6)

    # The user must reach STATEDIR/bin (units' binaries live there).
    setpriv --reuid="$uid" --regid="$gid" --init-groups -- test -x "$sd/bin" \
        || die "$sd/bin is not reachable by $user (uid $uid): a parent directory is not world-executable; choose another STATEDIR"

    # Leftovers of an earlier run of this slot that was never stopped: this slot's
    # lock is ours now, so nothing live owns them.
    local root dirs=()
    for root in $(cgroup_roots); do dirs+=("$root/user.slice/user-$uid.slice"); done
    if [[ -n $(for d in "${dirs[@]}"; do cgroup_pids "$d"; done) ]]; then
        log "warning: killing processes left in ${dirs[0]} by an earlier run that was not stopped"
        kill_cgroup_tree "${dirs[@]}" || die "could not clean up leftovers of slot $SLOT"
    fi
    for d in "${dirs[@]}"; do rmdir_tree "$d/user@$uid.service" || true; done

    # A fresh home for every manager: no unit files or state from earlier runs.
    find "$home" -mindepth 1 -maxdepth 1 ! -name "$MARKER" -exec rm -rf {} +
    install -d -o "$uid" -g "$gid" -m 0755 "$home/.config" "$home/.config/systemd" "$home/.config/systemd/user"

    with_setup_lock make_cgroups "$uid" "$user" "$gid"
    echo "$user" >"$sd/user"; echo "$uid" >"$sd/uid"; echo "$gid" >"$sd/gid"
    echo "$home" >"$sd/home"; echo "$SLOT" >"$sd/slot"; echo "/run/user/$uid" >"$sd/runtime_dir"
    printf '%s\n' "${dirs[@]/%//user@$uid.service}" >"$sd/cgroups"
    load_state "$sd"

    WK_E2E_LOCK_FD=$SLOT_FD setsid unshare --mount --propagation private -- \
        bash "$SELF" _holder "$sd" </dev/null >>"$sd/holder.log" 2>&1 &
    exec {SLOT_FD}>&-    # from now on only the holder keeps the slot locked

    deadline=$(($(now_ms) + ${WK_E2E_START_TIMEOUT:-30} * 1000))
    local fail=
    while :; do
        if [[ -s $sd/holder.pid ]] && ! alive "$sd/holder.pid"; then
            fail="the namespace holder exited"; break
        fi
        if [[ -s $sd/manager.pid ]]; then
            if ! alive "$sd/manager.pid"; then fail="systemd --user exited"; break; fi
            in_ns_cmd
            state=$("${NS_CMD[@]}" systemctl --user is-system-running 2>&1 || true)
            [[ $state == running || $state == degraded ]] && break
        fi
        if (($(now_ms) > deadline)); then
            fail="not running after ${WK_E2E_START_TIMEOUT:-30} s (is-system-running: ${state:-<manager not started>})"
            break
        fi
        sleep 0.05
    done
    if [[ -n $fail ]]; then
        {
            echo "$PROG: error: start failed: $fail"
            echo "--- $sd/holder.log:"; tail -n 20 "$sd/holder.log" 2>/dev/null || true
            echo "--- $sd/manager.log:"; tail -n 20 "$sd/manager.log" 2>/dev/null || true
            echo "--- journal:"; journalctl -D "$sd/journal" --no-pager -n 30 2>/dev/null || true
        } >&2
        do_stop "$sd" >/dev/null 2>&1 || true
        exit 1
    fi
    echo "$(( $(now_ms) - t0 ))" >"$sd/start_ms"
    # Optional owner (e.g. the test process): if it dies without calling stop
    # (SIGKILL, Ctrl-C, abort), a small reaper stops the manager and frees the slot.
    local owner=${WK_E2E_OWNER_PID:-} ostart
    if [[ -n $owner ]] && ostart=$(proc_field "$owner" 20); then
        setsid bash "$SELF" _reaper "$sd" "$owner" "$ostart" </dev/null >>"$sd/reaper.log" 2>&1 &
    fi
    log "manager PID $(pid_of "$sd/manager.pid") for $user (uid $uid, slot $SLOT) is $state after $(( $(now_ms) - t0 )) ms"
    echo ready
}

# --- reaper: stops the manager when its owner process is gone ---
cmd_reaper() { # STATEDIR OWNER_PID OWNER_STARTTIME
    local sd=$1 owner=$2 ostart=$3
    proc_id "$BASHPID" >"$sd/reaper.pid"
    while [[ ! -e $sd/stopped ]]; do
        if [[ "$(proc_field "$owner" 20 || true)" != "$ostart" || "$(proc_field "$owner" 1 || true)" == Z ]]; then
            log "owner PID $owner is gone without stopping the manager: stopping it"
            do_stop "$sd" || true
            return 0
        fi
        if ! alive "$sd/holder.pid"; then
            # Killed holder, or a stop in progress (then do_stop waits and no-ops).
            do_stop "$sd" || true
            return 0
        fi
        sleep 0.5
    done
}

# --- stop ---
do_stop() { # STATEDIR
    local sd=$1 t0 fd
    t0=$(now_ms)
    load_state "$sd" || { log "nothing to stop in $sd"; return 0; }
    exec {fd}>>"$sd/stop.lock"
    flock "$fd"     # the reaper and an explicit stop never run at once
    if [[ -e $sd/stopped ]]; then exec {fd}>&-; return 0; fi
    # SIGTERM = `systemctl --user exit`: the manager stops its units and exits.
    terminate "$sd/manager.pid" "systemd --user" $((${WK_E2E_STOP_TIMEOUT:-20} * 1000))
    local dirs=() ok=0
    [[ -s $sd/cgroups ]] && mapfile -t dirs <"$sd/cgroups"
    kill_cgroup_tree "${dirs[@]}" || ok=1
    # Remove this UID's cgroups while the holder still keeps the slot locked.
    for d in "${dirs[@]}"; do
        rmdir_tree "$d" || ok=1
        rmdir "${d%/*}" 2>/dev/null || true     # user-UID.slice
    done
    terminate "$sd/journald.pid" systemd-journald 5000
    terminate "$sd/holder.pid" "namespace holder" 5000
    with_setup_lock rmdir_shared_parents
    if [[ -s $sd/reaper.pid && "$(pid_of "$sd/reaper.pid")" != "$BASHPID" ]]; then
        terminate "$sd/reaper.pid" reaper 2000
    fi
    exec {fd}>&-
    echo "$(( $(now_ms) - t0 ))" >"$sd/stop_ms"
    touch "$sd/stopped"
    log "stopped manager of $sd in $(( $(now_ms) - t0 )) ms"
    return $ok
}
cmd_stop() {
    need_root stop
    [[ $# -eq 1 ]] || die "usage: $PROG stop STATEDIR"
    local sd
    sd=$(realpath -m "$1")
    [[ -d $sd ]] || die "stop: no such state dir: $sd"
    do_stop "$sd" || die "stop: some processes or cgroups of $sd could not be cleaned (see above)"
    echo stopped
}

# --- check ---
cmd_check() {
    local why=() roots r
    if [[ $EUID -ne 0 ]]; then
        local s note=
        s=$(systemctl --user is-system-running 2>/dev/null || true)
        case $s in running | degraded | starting)
            note=" (this user's own manager is $s: the Rust harness uses it with WK_E2E_OWN_MANAGER=1)" ;;
        esac
        why+=("not root (uid $EUID): the private manager needs root for its mount namespace and cgroups$note")
    fi
    if [[ "$(cat /proc/1/comm 2>/dev/null)" == systemd ]]; then
        why+=("PID 1 is systemd: use the real user@UID.service there; this harness is for machines without systemd as PID 1")
    fi
    roots=$(cgroup_roots)
    if [[ -z $roots ]]; then
        why+=("no cgroup hierarchy systemd can use under /sys/fs/cgroup (need cgroup2 or v1 name=systemd)")
    fi
    for r in $roots; do
        [[ -w $r ]] || why+=("cgroup hierarchy $r is not writable")
    done
    if command -v unshare >/dev/null; then
        [[ $EUID -ne 0 ]] || unshare --mount --propagation private true 2>/dev/null \
            || why+=("cannot create a mount namespace (unshare --mount failed)")
    fi
    if [[ ! -x $SYSTEMD_BIN ]] || ! command -v nsenter >/dev/null || ! command -v setpriv >/dev/null; then
        command -v apt-get >/dev/null \
            || why+=("$SYSTEMD_BIN/nsenter/setpriv missing and no apt-get to install systemd util-linux")
    fi
    if ((${#why[@]})); then
        echo "cannot host a private systemd user manager here:"
        printf '  - %s\n' "${why[@]}"
        return 1
    fi
    echo "ok: root, cgroup hierarchies: ${roots//$'\n'/ }, PID 1 is $(cat /proc/1/comm)"
}

main() {
    local sub=${1:-}
    shift || true
    case $sub in
        check) cmd_check "$@" ;;
        start) cmd_start "$@" ;;
        run) cmd_run "$@" ;;
        stop) cmd_stop "$@" ;;
        _holder) cmd_holder "$@" ;;
        _reaper) cmd_reaper "$@" ;;
        *) die "usage: $PROG check | start STATEDIR | run STATEDIR -- CMD... | stop STATEDIR" ;;
    esac
}
main "$@"; exit $?  # one line: bash reads scripts lazily, an edit must not hit a running holder
