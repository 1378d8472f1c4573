#!/bin/sh
# Boot systemd as PID 1 of a throwaway copy of this host, for the end-to-end suite.
#
#   boot_systemd.sh BASE CHECKOUT
#
# Run it inside fresh PID, mount, UTS, IPC and cgroup namespaces (systemd_sandbox.py starts it
# under unshare(1)); it ends by becoming systemd. Every mount below is made in that private mount
# namespace, so they all vanish with it, and the host's mount table never changes:
#
# - BASE gets a tmpfs holding the upper and work folders of an overlay whose lower layer is
#   the host's root: systemd and everything the tests install write only into the tmpfs.
# - /run, /tmp and /dev/shm are fresh tmpfs: systemd-tmpfiles empties /tmp at boot, which
#   must never be the host's /tmp.
# - /dev is a tmpfs with only the harmless device nodes bound in, so that nothing in the
#   sandbox (udev, tmpfiles, journald's /dev/log) can create or change the host's devices.
# - /proc/sys and /sys are read-only, as a container manager makes them: units that tune
#   the kernel skip themselves (ConditionPathIsReadWrite=), the rest fail harmlessly.
# - /sys/fs/cgroup is a new cgroup2 mount, rooted (through the cgroup namespace) at the
#   cgroup that systemd_sandbox.py made for this sandbox and removes afterwards.
# - CHECKOUT, the folder being tested, is bound read-only at its own path.
#
# The units that could reach beyond the sandbox (the clock, the network, kernel modules,
# binfmt, the console, the disk) are masked, and the capabilities they would need are
# dropped from the bounding set before systemd starts: the network namespace is the host's,
# so that the tests reach sshd and the webhook on 127.0.0.1, but nothing can reconfigure it.

set -eu

base=$1
checkout=$2
root=$base/root

mount -t tmpfs -o mode=0755 stagewatch-e2e "$base"
mkdir "$base/upper" "$base/work" "$root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$base/upper,workdir=$base/work" "$root"

mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount --bind "$root/proc/sys" "$root/proc/sys"
mount -o remount,bind,ro,nosuid,nodev,noexec "$root/proc/sys"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$root/sys/fs/cgroup"

mount -t tmpfs -o mode=0755,nosuid dev "$root/dev"
for node in null zero full random urandom tty; do
    touch "$root/dev/$node"
    mount --bind "/dev/$node" "$root/dev/$node"
done
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$root/dev/shm"

mount -t tmpfs -o mode=0755,nosuid,nodev run "$root/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmp "$root/tmp"

mkdir -p "$root$checkout"
mount --bind "$checkout" "$root$checkout"
mount -o remount,bind,ro "$root$checkout"

# No file systems to mount or check, no encrypted volumes to open: only the overlay exists.
: >"$root/etc/fstab"
rm -f "$root/etc/crypttab"

for unit in \
    systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket \
    systemd-udev-trigger.service systemd-udev-settle.service systemd-hwdb-update.service \
    systemd-networkd.service systemd-networkd.socket systemd-networkd-wait-online.service \
    systemd-resolved.service systemd-timesyncd.service systemd-time-wait-sync.service \
    systemd-modules-load.service systemd-sysctl.service systemd-binfmt.service \
    proc-sys-fs-binfmt_misc.automount proc-sys-fs-binfmt_misc.mount \
    systemd-random-seed.service systemd-pstore.service systemd-journald-audit.socket \
    systemd-remount-fs.service systemd-fsck-root.service systemd-logind.service \
    getty.target getty@.service serial-getty@.service console-getty.service \
    apt-daily.timer apt-daily-upgrade.timer man-db.timer dpkg-db-backup.timer \
    e2scrub_all.timer e2scrub_reap.service fstrim.timer \
    ssh.service postgresql.service webhook.service; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done

# The overlay becomes the root; the host's root, moved aside by pivot_root(8), is detached
# at once. A chroot would do for systemd, but a process in a chroot may not create user
# namespaces (user_namespaces(7)), and PrivateUsers= and friends need them.
cd "$root"
mkdir run/old-root
pivot_root . run/old-root
cd /
umount -l /run/old-root
rmdir /run/old-root

# systemd makes / shared itself only when it is not in a container, where it expects the
# container manager to have done so; it needs it, for instance, to move the credentials of a
# unit (LoadCredential=) from the namespace where it prepares them into its own. Shared here
# means shared within this private namespace: no mount of the host is a peer of these.
mount --make-rshared /

export container=other
exec setpriv \
    --bounding-set=-sys_module,-sys_time,-net_admin,-sys_rawio,-syslog,-wake_alarm,-sys_boot,-mac_admin,-mac_override,-block_suspend,-sys_tty_config \
    /lib/systemd/systemd --system --unit=basic.target
