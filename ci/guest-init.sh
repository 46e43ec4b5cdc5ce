#!/bin/sh
# /init of the test guest (installed by ci/build-guest.sh). Busybox sh.
# Kernel command line: vhc.ndisks=N (wait for N virtio disks), vhc.plan=SERIAL (disk holding the script,
# default "plan"), vhc.script=PATH (script inside the guest instead of a plan disk).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/disk/by-serial /tmp
mount -t tmpfs tmpfs /tmp

ndisks=0; plan=plan; script=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vhc.ndisks=*) ndisks=${arg#vhc.ndisks=} ;;
        vhc.plan=*) plan=${arg#vhc.plan=} ;;
        vhc.script=*) script=${arg#vhc.script=} ;;
    esac
done

for m in $(cat /lib/modules/load.order); do
    insmod "/lib/modules/$m" 2>/tmp/insmod.err || {
        # crc32c-intel needs SSE4.2; harmless when missing (crc32c_generic serves)
        grep -q 'File exists' /tmp/insmod.err || echo "GUEST_WARN insmod $m: $(cat /tmp/insmod.err)"
    }
done

# wait for the expected number of virtio disks
i=0
while :; do
    n=$(ls -d /sys/block/vd* 2>/dev/null | wc -l)
    [ "$n" -ge "$ndisks" ] && break
    i=$((i + 1))
    if [ "$i" -ge 100 ]; then echo "GUEST_WARN only $n of $ndisks disks appeared"; break; fi
    sleep 0.1
done

# name the disks: serial -> /dev/disk/by-serial/S, $DISK_S; vhost-user-blk (PCI slot 0x08..0x0f) -> vhostI
VHOST_DISKS=
for d in /sys/block/vd*; do
    [ -e "$d" ] || continue
    name=${d##*/}
    path=$(readlink -f "$d/device/..")   # .../0000:00:SS.F
    slot=${path##*/}; slot=${slot#*:*:}; slot=${slot%.*}
    case "$slot" in
        0[89a-f])
            idx=$((0x$slot - 8))
            ln -sf "/dev/$name" "/dev/disk/vhost$idx"
            export "DISK_vhost$idx=/dev/$name"
            VHOST_DISKS="$VHOST_DISKS /dev/$name"
            echo "GUEST_DISK name=$name vhost=$idx sectors=$(cat "$d/size")"
            continue ;;
    esac
    serial=$(cat "$d/serial" 2>/dev/null)
    if [ -n "$serial" ]; then
        ln -sf "/dev/$name" "/dev/disk/by-serial/$serial"
        var=$(echo "$serial" | tr -c 'A-Za-z0-9_\n' '_')
        export "DISK_$var=/dev/$name"
    fi
    echo "GUEST_DISK name=$name serial=$serial sectors=$(cat "$d/size")"
done
export VHOST_DISKS="${VHOST_DISKS# }"
export DM_DISABLE_UDEV=1 HOME=/tmp

if [ -z "$script" ] && [ -e "/dev/disk/by-serial/$plan" ]; then
    # the plan disk holds the script padded with newlines to a 4 KiB multiple
    cat "/dev/disk/by-serial/$plan" > /tmp/plan.sh
    script=/tmp/plan.sh
fi
if [ -n "$script" ]; then
    echo "GUEST_START t=$(cut -d' ' -f1 /proc/uptime)"
    cd /tmp && sh "$script"
    rc=$?
else
    echo "GUEST_WARN no script (no disk with serial $plan, no vhc.script=)"
    rc=127
fi
sync
echo "GUEST_EXIT=$rc t=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
