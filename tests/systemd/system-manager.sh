#!/usr/bin/env bash
# Private systemd *system* manager for watchkeeper's end-to-end tests of system-mode units
# (`User=`, sysusers, /etc/systemd/system, StateDirectory= under /var/lib).
#
# systemd runs as PID 1 of a private pid/mount/net/uts/ipc/cgroup namespace, in a cgroup
# of its own; see shared/reference/systemd-on-these-machines.md section 5.
#
#   system-manager.sh check                      exit 0 if this machine can host one
#   system-manager.sh start STATEDIR             set up + start; prints "ready"
#   system-manager.sh run STATEDIR [--as USER] -- CMD...
#                                                CMD inside the namespace (as root, or USER)
#   system-manager.sh stop STATEDIR              SIGKILL to its PID 1: everything in it ends
#
# The host is never written by what runs inside:
#   * /etc, /usr/local, /var/lib, /var/cache, /var/log, /var/spool, /root and /home are
#     overlays inside the namespace, their upper layers on a tmpfs that vanishes with it:
#     `useradd`/systemd-sysusers, unit files, state directories, binaries installed below
#     /usr/local all land there;
#   * everything else of the root file system is read-only inside (a per-mount flag: the
#     host's mount is untouched); /run, /tmp, /var/tmp and /dev are fresh tmpfs;
#   * the kernel's settings stay the host's: /sys is a fresh sysfs mounted read-only (with
#     cgroup2 on /sys/fs/cgroup, whose root is the manager's own cgroup), /proc/sys is
#     read-only but for this network namespace's /proc/sys/net, and systemd runs without
#     CAP_SYS_MODULE, CAP_SYS_TIME, CAP_SYS_RAWIO, CAP_SYSLOG and CAP_WAKE_ALARM (PID 1 would
#     otherwise raise fs.file-max and load kernel modules for the whole machine);
#   * the manager starts wk-e2e.target (DefaultDependencies=no), which pulls in only
#     journald and D-Bus. Every unit the tests start gets a runtime drop-in
#     (/run/systemd/system/UNIT.d/wk-e2e.conf) with DefaultDependencies=no, so that
#     sysinit.target and basic.target (tmpfiles --boot --remove, sysctl, udev, remount-fs, all
#     meant for a real boot of this machine) are never pulled in; as a second guard those
#     units, and the shutdown targets, are masked (/run/systemd/system.control/UNIT -> /dev/null).
# Never poweroff/halt inside: systemd-shutdown would remount the (shared) root read-only.
# unshare runs with --kill-child: when it dies, the namespace's PID 1 and all in it die too.
#
# STATEDIR files: init.pid ("PID STARTTIME", the namespace's PID 1 seen from the host),
# unshare.pid, cgroup, console (the manager's console), init.log, reaper.log, stopped.
# Knobs: WK_E2E_START_TIMEOUT (30 s); WK_E2E_RUN_TIMEOUT (120 s, for each `run`);
# WK_E2E_OWNER_PID: stop the manager when that process dies without stopping it, also during
# the start (the Rust harness sets it to the test process).
set -euo pipefail

PROG=${0##*/}
SELF=$(readlink -f "${BASH_SOURCE[0]}")
SYSTEMD_BIN=/usr/lib/systemd/systemd
# dbus: the system bus inside, for systemctl run by a user other than root.
REQUIRED_PKGS=(systemd util-linux mount passwd dbus)
LOCK_DIR=/run/lock/wk-e2e
PATH_IN_NS=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin
OVERLAID=(/etc /usr/local /var/lib /var/cache /var/log /var/spool /var/mail /root /home)
# The units the tests start (each gets DefaultDependencies=no), besides journald and D-Bus.
TEST_UNITS=(watchkeeper-daemon.socket watchkeeper-daemon.service watchkeeper-worker.service
    watchkeeper-worker@.service watchkeeper-metrics.service watchkeeper-metrics.timer
    dbus.socket dbus.service)
# Early-boot units meant for the real machine: masked inside.
MASKED=(sysinit.target basic.target local-fs.target local-fs-pre.target swap.target
    multi-user.target graphical.target sockets.target timers.target paths.target
    systemd-remount-fs.service systemd-tmpfiles-setup.service systemd-tmpfiles-setup-dev.service
    systemd-tmpfiles-clean.service systemd-tmpfiles-clean.timer systemd-sysctl.service
    systemd-udevd.service systemd-udev-trigger.service systemd-udev-settle.service
    systemd-modules-load.service systemd-binfmt.service systemd-random-seed.service
    systemd-update-utmp.service systemd-sysusers.service systemd-firstboot.service
    systemd-machine-id-commit.service systemd-journal-flush.service systemd-hwdb-update.service
    systemd-repart.service systemd-pcrphase.service systemd-pcrphase-sysinit.service
    systemd-fsck-root.service systemd-timesyncd.service systemd-logind.service
    kmod-static-nodes.service ldconfig.service apt-daily.timer apt-daily-upgrade.timer
    e2scrub_all.timer fstrim.timer logrotate.timer man-db.timer dpkg-db-backup.timer
    cron.service getty.target console-getty.service serial-getty@.service getty@.service
    poweroff.target halt.target reboot.target kexec.target ctrl-alt-del.target
    systemd-poweroff.service systemd-halt.service systemd-reboot.service systemd-kexec.service)
# Capabilities systemd and its units never get inside: they act on the whole machine.
DROPPED_CAPS=-sys_module,-sys_time,-sys_rawio,-syslog,-wake_alarm

log() { echo "$PROG: $*" >&2; }
die() { echo "$PROG: error: $*" >&2; exit 1; }
now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }
need_root() { [[ $EUID -eq 0 ]] || die "'$1' needs root (running as uid $EUID)"; }

# --- processes, identified by PID + start time (a reused PID is never hit) ---
proc_start() { # PID -> its start time (field 22 of /proc/PID/stat)
    local stat rest fields
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    rest=${stat##*) }
    read -r -a fields <<<"$rest"
    [[ -n ${fields[19]:-} && ${fields[0]} != Z ]] || return 1
    echo "${fields[19]}"
}
alive() { # FILE with "PID STARTTIME"
    local pid st
    [[ -s $1 ]] || return 1
    read -r pid st <"$1" || return 1
    [[ "$(proc_start "$pid" || true)" == "$st" ]]
}
pid_of() { local pid _; read -r pid _ <"$1"; echo "$pid"; }

# --- cgroups: the v2 hierarchy (unified, or "unified" of a hybrid host) ---
cgroup2_root() {
    if [[ $(stat -fc %T /sys/fs/cgroup 2>/dev/null) == cgroup2fs ]]; then
        echo /sys/fs/cgroup
    elif [[ -d /sys/fs/cgroup/unified && $(stat -fc %T /sys/fs/cgroup/unified) == cgroup2fs ]]; then
        echo /sys/fs/cgroup/unified
    fi
}
cgroup_pids() { [[ -d $1 ]] && find "$1" -name cgroup.procs -exec cat {} + 2>/dev/null; true; }

# --- packages, installed when missing (serialized with user-manager.sh's setup) ---
ensure_packages() {
    local missing=() p fd
    command -v dpkg-query >/dev/null || return 0
    for p in "${REQUIRED_PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    mkdir -p "$LOCK_DIR"
    exec {fd}>>"$LOCK_DIR/setup.lock"
    flock -w 900 "$fd" || die "timed out waiting for $LOCK_DIR/setup.lock"
    log "installing missing packages: ${missing[*]}"
    # No service of the packages may start on the host (dbus's postinst would start a system
    # bus): a policy-rc.d that refuses, for the time of the install, unless one is there.
    local policy=/usr/sbin/policy-rc.d own_policy=
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# system-manager.sh: no service starts while it installs packages\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        own_policy=1
    fi
    local rc=0
    { apt-get update -qq >&2 \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >&2; } || rc=$?
    [[ -n $own_policy ]] && rm -f "$policy"
    exec {fd}>&-
    ((rc == 0)) || die "apt-get install ${missing[*]} failed"
}

# --- inside: PID 1 of the new namespaces, as root, before exec'ing systemd ---
cmd_init() {
    local sd=$1
    export LIBMOUNT_UTAB=/run/wk-e2e-utab
    # A fresh sysfs (this network namespace's), read-only, with the cgroup namespace's cgroup2
    # on it; /proc/sys read-only but for this network namespace's part.
    mount -t sysfs -o ro,nosuid,nodev,noexec sysfs /sys
    mount -t cgroup2 -o nosuid,nodev,noexec,nsdelegate cgroup2 /sys/fs/cgroup
    mount --bind /proc/sys /proc/sys
    mount -o remount,bind,ro,nosuid,nodev,noexec /proc/sys
    mount --bind /proc/sys/net /proc/sys/net
    mount -o remount,bind,rw,nosuid,nodev,noexec /proc/sys/net
    # /dev: the basic nodes, devpts, shm, and a console that is a file.
    mount -t tmpfs -o mode=0755,nosuid,size=4m tmpfs /dev
    mknod -m 0666 /dev/null c 1 3
    mknod -m 0666 /dev/zero c 1 5
    mknod -m 0666 /dev/full c 1 7
    mknod -m 0666 /dev/random c 1 8
    mknod -m 0666 /dev/urandom c 1 9
    mknod -m 0666 /dev/tty c 5 0
    mkdir -m 0755 /dev/pts /dev/shm
    mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts /dev/pts
    ln -s pts/ptmx /dev/ptmx
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
    ln -s /proc/self/fd /dev/fd
    ln -s /proc/self/fd/0 /dev/stdin
    ln -s /proc/self/fd/1 /dev/stdout
    ln -s /proc/self/fd/2 /dev/stderr
    touch /dev/console
    mount --bind "$sd/console" /dev/console
    # Fresh /run, /tmp and /var/tmp.
    mount -t tmpfs -o mode=0755,nosuid,nodev,size=256m tmpfs /run
    mount -t tmpfs -o mode=1777,nosuid,nodev,size=256m tmpfs /tmp
    mount -t tmpfs -o mode=1777,nosuid,nodev,size=64m tmpfs /var/tmp
    # Copy-on-write views of the trees that installs and managers write, upper layers on a
    # tmpfs of their own.
    mkdir -m 0700 /run/wk-e2e-overlay
    mount -t tmpfs -o mode=0700,size=2g tmpfs /run/wk-e2e-overlay
    local t n
    for t in "${OVERLAID[@]}"; do
        [[ -d $t ]] || continue
        n=${t//\//_}
        mkdir -p "/run/wk-e2e-overlay/$n/upper" "/run/wk-e2e-overlay/$n/work"
        mount -t overlay overlay \
            -o "lowerdir=$t,upperdir=/run/wk-e2e-overlay/$n/upper,workdir=/run/wk-e2e-overlay/$n/work" "$t"
    done
    # The test target, the drop-ins and the masks.
    mkdir -p /run/systemd/system /run/systemd/system.control /run/systemd/journald.conf.d
    cat >/run/systemd/system/wk-e2e.target <<'EOF'
[Unit]
Description=watchkeeper end-to-end tests (private system manager)
DefaultDependencies=no
Wants=systemd-journald.socket systemd-journald.service dbus.socket
EOF
    for t in "${TEST_UNITS[@]}"; do
        mkdir -p "/run/systemd/system/$t.d"
        printf '[Unit]\nDefaultDependencies=no\n' >"/run/systemd/system/$t.d/wk-e2e.conf"
    done
    for t in "${MASKED[@]}"; do ln -s /dev/null "/run/systemd/system.control/$t"; done
    cat >/run/systemd/journald.conf.d/wk-e2e.conf <<'EOF'
[Journal]
Storage=volatile
RuntimeMaxUse=32M
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
ReadKMsg=no
Audit=no
RateLimitIntervalSec=0
EOF
    # Shared propagation inside the namespace (new peer groups, cut off from the host by the
    # private step of unshare), as on a booted system: systemd sets up a unit's credentials in
    # a child mount namespace and moves them to /run/credentials/UNIT, which reaches PID 1's
    # namespace only through a shared /run. In a container systemd leaves / as it finds it.
    # The rest of the root file system read-only (this mount only; the overlays, tmpfs and
    # binds above stay as they are).
    mount -o remount,bind,ro /
    mount --make-rshared /
    exec setpriv --bounding-set="$DROPPED_CAPS" --inh-caps="$DROPPED_CAPS" -- \
        env -i container=wk-e2e-system PATH="$PATH_IN_NS" LANG=C.UTF-8 \
        "$SYSTEMD_BIN" --system --unit=wk-e2e.target --log-level=info --log-target=console \
        --show-status=no
}

ns_cmd() { # sets NS_CMD: nsenter into every namespace of the manager
    NS_CMD=(nsenter -t "$(pid_of "$SD/init.pid")" -m -u -i -n -p -C --wd=/ --)
}

# --- start ---
cmd_start() {
    need_root start
    [[ $# -eq 1 ]] || die "usage: $PROG start STATEDIR"
    local t0 sd deadline state= fail= root cg
    t0=$(now_ms)
    sd=$(realpath -m "$1")
    [[ -e $sd/init.pid ]] && die "$sd was already used for a manager; use a fresh STATEDIR"
    mkdir -p "$sd"
    SD=$sd
    ensure_packages
    [[ -x $SYSTEMD_BIN ]] || die "$SYSTEMD_BIN is missing (apt-get install systemd)"
    root=$(cgroup2_root)
    [[ -n $root ]] || die "no cgroup2 hierarchy under /sys/fs/cgroup"
    cg=$root/wk-e2e-system-${sd##*/}
    mkdir "$cg" || die "cannot create cgroup $cg"
    echo "$cg" >"$sd/cgroup"
    : >"$sd/console"
    # From its own cgroup, so that it is the cgroup namespace's root.
    (
        echo "$BASHPID" >"$cg/cgroup.procs"
        exec setsid unshare --pid --fork --kill-child --mount-proc --mount --uts --ipc --net \
            --cgroup --propagation private -- bash "$SELF" _init "$sd"
    ) </dev/null >>"$sd/init.log" 2>&1 &
    local upid=$! ustart
    ustart=$(proc_start "$upid" || echo gone)
    echo "$upid $ustart" >"$sd/unshare.pid"
    # Optional owner (the test process): if it dies without stopping the manager (SIGKILL,
    # Ctrl-C, abort), even now during the start, a small reaper ends it. It is told what to
    # end, so that it needs nothing of STATEDIR.
    local owner=${WK_E2E_OWNER_PID:-} ostart
    if [[ -n $owner ]]; then
        ostart=$(proc_start "$owner" || echo gone)
        setsid bash "$SELF" _reaper "$sd" "$owner" "$ostart" "$upid" "$ustart" "$cg" \
            </dev/null >>"$sd/reaper.log" 2>&1 &
    fi
    deadline=$(($(now_ms) + ${WK_E2E_START_TIMEOUT:-30} * 1000))
    local child=
    while :; do
        child=$(cat "/proc/$upid/task/$upid/children" 2>/dev/null || true)
        child=${child%% *}
        if [[ -n $child ]]; then
            echo "$child $(proc_start "$child")" >"$sd/init.pid"
            break
        fi
        kill -0 "$upid" 2>/dev/null || { fail="unshare exited"; break; }
        (($(now_ms) < deadline)) || { fail="no namespace after ${WK_E2E_START_TIMEOUT:-30} s"; break; }
        sleep 0.01
    done
    while [[ -z $fail ]]; do
        alive "$sd/init.pid" || { fail="the manager (PID 1 of the namespace) exited"; break; }
        if [[ $(readlink "/proc/$child/exe" 2>/dev/null) == "$SYSTEMD_BIN" ]]; then
            ns_cmd
            state=$("${NS_CMD[@]}" systemctl is-system-running 2>&1 || true)
            [[ $state == running || $state == degraded ]] && break
        fi
        (($(now_ms) < deadline)) || { fail="not running after ${WK_E2E_START_TIMEOUT:-30} s (is-system-running: ${state:-<not started>})"; break; }
        sleep 0.05
    done
    if [[ -n $fail ]]; then
        {
            echo "$PROG: error: start failed: $fail"
            echo "--- $sd/init.log:"; tail -n 20 "$sd/init.log" 2>/dev/null || true
            echo "--- $sd/console:"; tail -n 30 "$sd/console" 2>/dev/null || true
        } >&2
        do_stop "$sd" >/dev/null 2>&1 || true
        exit 1
    fi
    log "system manager PID $(pid_of "$sd/init.pid") is $state after $(($(now_ms) - t0)) ms"
    echo ready
}

cmd_run() {
    need_root run
    [[ $# -ge 1 ]] || die "usage: $PROG run STATEDIR [--as USER] -- CMD..."
    SD=$(realpath -m "$1"); shift
    local as=
    if [[ ${1:-} == --as ]]; then as=$2; shift 2; fi
    [[ ${1:-} == -- ]] && shift
    [[ $# -ge 1 ]] || die "run: no command given"
    alive "$SD/init.pid" || die "run: the manager of $SD is not running (see $SD/console)"
    ns_cmd
    if [[ -n $as ]]; then
        exec "${NS_CMD[@]}" setpriv --reuid="$as" --regid="$as" --init-groups -- \
            env -i PATH="$PATH_IN_NS" LANG=C.UTF-8 USER="$as" LOGNAME="$as" HOME=/ \
            timeout -k 5 "${WK_E2E_RUN_TIMEOUT:-120}" "$@"
    fi
    exec "${NS_CMD[@]}" env -i PATH="$PATH_IN_NS" LANG=C.UTF-8 HOME=/root USER=root \
        timeout -k 5 "${WK_E2E_RUN_TIMEOUT:-120}" "$@"
}

# --- stop: SIGKILL to the namespace's PID 1 ends every process in it ---
# end_namespace UNSHARE_PID UNSHARE_START INIT_PID INIT_START CGROUP: SIGKILL to the namespace's
# PID 1 and to unshare (whose --kill-child ends PID 1 too), by PID and start time; then the
# cgroup is removed. Empty or "gone" fields are skipped.
end_namespace() {
    local upid=$1 ustart=$2 ipid=$3 istart=$4 cg=$5 deadline
    is() { [[ -n $1 && -n $2 && $2 != gone && "$(proc_start "$1" || true)" == "$2" ]]; }
    is "$ipid" "$istart" && kill -KILL "$ipid" 2>/dev/null
    is "$upid" "$ustart" && kill -KILL "$upid" 2>/dev/null
    deadline=$(($(now_ms) + 10000))
    while is "$ipid" "$istart" || is "$upid" "$ustart"; do
        (($(now_ms) < deadline)) || { log "warning: the namespace did not end in 10 s"; return 1; }
        sleep 0.02
    done
    if [[ -n $cg && -d $cg ]]; then
        deadline=$(($(now_ms) + 5000))
        while [[ -n $(cgroup_pids "$cg") ]]; do
            (($(now_ms) < deadline)) || { log "warning: processes left in $cg: $(cgroup_pids "$cg" | tr '\n' ' ')"; return 1; }
            sleep 0.02
        done
        find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
        [[ ! -d $cg ]] || { log "warning: could not remove $cg"; return 1; }
    fi
}
do_stop() {
    local sd=$1 t0 upid= ustart= ipid= istart= cg=
    t0=$(now_ms)
    [[ -s $sd/unshare.pid ]] && read -r upid ustart <"$sd/unshare.pid"
    [[ -s $sd/init.pid ]] && read -r ipid istart <"$sd/init.pid"
    [[ -s $sd/cgroup ]] && cg=$(<"$sd/cgroup")
    end_namespace "$upid" "$ustart" "$ipid" "$istart" "$cg" || return 1
    touch "$sd/stopped"
    log "stopped the system manager of $sd in $(($(now_ms) - t0)) ms"
}
cmd_reaper() { # STATEDIR OWNER_PID OWNER_START UNSHARE_PID UNSHARE_START CGROUP
    local sd=$1 owner=$2 ostart=$3 upid=$4 ustart=$5 cg=$6
    while [[ ! -e $sd/stopped ]]; do
        if [[ $ostart == gone || "$(proc_start "$owner" || true)" != "$ostart" ]]; then
            log "owner PID $owner is gone without stopping the manager: ending it"
            end_namespace "$upid" "$ustart" "" "" "$cg" || true
            touch "$sd/stopped" 2>/dev/null || true
            return 0
        fi
        # Ended otherwise (stop, or a crash): nothing left to watch.
        [[ "$(proc_start "$upid" || true)" == "$ustart" ]] || return 0
        sleep 0.5
    done
}
cmd_stop() {
    need_root stop
    [[ $# -eq 1 ]] || die "usage: $PROG stop STATEDIR"
    local sd
    sd=$(realpath -m "$1")
    [[ -d $sd ]] || die "stop: no such state dir: $sd"
    do_stop "$sd" || die "stop: $sd could not be cleaned up (see above)"
    echo stopped
}

cmd_check() {
    local why=()
    [[ $EUID -eq 0 ]] || why+=("not root (uid $EUID): a private system manager needs root")
    [[ "$(cat /proc/1/comm 2>/dev/null)" != systemd ]] \
        || why+=("PID 1 is systemd here: a second system manager is not started next to it")
    [[ -x $SYSTEMD_BIN ]] || command -v apt-get >/dev/null \
        || why+=("$SYSTEMD_BIN is missing and there is no apt-get to install systemd")
    [[ -n $(cgroup2_root) ]] || why+=("no cgroup2 hierarchy under /sys/fs/cgroup")
    grep -qw overlay /proc/filesystems \
        || why+=("no overlay file system (needed to keep /etc and /var/lib of the host untouched; modprobe overlay)")
    if [[ $EUID -eq 0 ]] && ! unshare --pid --fork --mount --cgroup --net --propagation private true 2>/dev/null; then
        why+=("cannot create pid/mount/cgroup/net namespaces")
    fi
    if ((${#why[@]})); then
        echo "cannot host a private systemd system manager here:"
        printf '  - %s\n' "${why[@]}"
        return 1
    fi
    echo "ok: root, cgroup2 at $(cgroup2_root), PID 1 is $(cat /proc/1/comm)"
}

main() {
    local sub=${1:-}
    shift || true
    case $sub in
        check) cmd_check "$@" ;;
        start) cmd_start "$@" ;;
        run) cmd_run "$@" ;;
        stop) cmd_stop "$@" ;;
        _init) cmd_init "$@" ;;
        _reaper) cmd_reaper "$@" ;;
        *) die "usage: $PROG check | start STATEDIR | run STATEDIR [--as USER] -- CMD... | stop STATEDIR" ;;
    esac
}
main "$@"; exit $?  # one line: bash reads scripts lazily, an edit must not hit a running manager
