#!/usr/bin/env bash
# Build a tiny Linux guest (kernel + busybox initramfs) for tapbroker end-to-end tests.
#
#   usage: build-guest.sh OUTDIR
#
# Produces OUTDIR/vmlinuz, OUTDIR/initrd.img (gzip'd newc cpio) and OUTDIR/stamp.
# Only uses what is installed on the host (Debian packages linux-image-amd64,
# busybox-static, cpio, kmod); nothing is downloaded. A second call with the same
# kernel, busybox, modules and script content is a fast no-op. Outputs are
# written to a temp dir inside OUTDIR and renamed into place, so readers never see
# a half-written file. See README.md in this directory for the guest's protocol.
set -euo pipefail

# Wanted modules, in load order. Built-ins are skipped, absent ones are skipped
# with a warning; dependencies missing from this list are inserted automatically.
WANTED_MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev
                virtio_pci failover net_failover virtio_net)
BUSYBOX=/bin/busybox

die() { echo "build-guest: error: $*" >&2; exit 1; }
warn() { echo "build-guest: warning: $*" >&2; }

[[ $# -eq 1 && -n $1 ]] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
umask 022
SELF=$(readlink -f "${BASH_SOURCE[0]}")
mkdir -p -- "$1"
OUTDIR=$(readlink -f -- "$1")
# qemu may run as an unprivileged uid (65534): OUTDIR itself must be traversable.
chmod go+rx -- "$OUTDIR"

# ---- pick the newest installed kernel that has a matching module tree --------
KVER=
while IFS= read -r v; do
  [[ -d /lib/modules/$v ]] && KVER=$v
done < <(for k in /boot/vmlinuz-*; do [[ -f $k ]] && echo "${k#/boot/vmlinuz-}"; done | sort -V)
[[ -n $KVER ]] || die "no /boot/vmlinuz-* with a matching /lib/modules/<version> found"
KERNEL=/boot/vmlinuz-$KVER
MODDIR=/lib/modules/$KVER
[[ -r $KERNEL ]] || die "$KERNEL is not readable (run as root?)"
[[ -f $MODDIR/modules.dep && -f $MODDIR/modules.builtin ]] || die "$MODDIR/modules.{dep,builtin} missing"
[[ -x $BUSYBOX ]] || die "$BUSYBOX not found (apt-get install busybox-static)"
if ldd "$BUSYBOX" >/dev/null 2>&1; then die "$BUSYBOX is dynamically linked; need busybox-static"; fi

# ---- resolve modules (name -> path relative to MODDIR, or builtin/absent) ------
norm() { echo "${1//-/_}"; }
declare -A DEPLINE=() BUILTIN=() RELPATH=()
# (plain parameter expansion only: this runs for every module of the kernel)
while IFS= read -r line; do
  rel=${line%%:*}; name=${rel##*/}; name=${name%%.ko*}; name=${name//-/_}
  RELPATH[$name]=$rel; DEPLINE[$name]=${line#*:}
done < "$MODDIR/modules.dep"
while IFS= read -r rel; do
  name=${rel##*/}; name=${name%%.ko*}; BUILTIN[${name//-/_}]=1
done < "$MODDIR/modules.builtin"

LOAD_ORDER=() BUILTINS_SEEN=() ABSENT=() ADDED_DEPS=()
declare -A QUEUED=()
add_module() { # $1 = name, $2 = 1 if explicitly wanted
  local name; name=$(norm "$1")
  [[ -n ${QUEUED[$name]:-} ]] && return 0
  QUEUED[$name]=1
  if [[ -n ${BUILTIN[$name]:-} ]]; then BUILTINS_SEEN+=("$name"); return 0; fi
  if [[ -z ${RELPATH[$name]:-} ]]; then
    [[ $2 == 1 ]] || die "dependency $name not found in $MODDIR/modules.dep"
    ABSENT+=("$name"); return 0
  fi
  # modules.dep lists deps so that loading them in reverse order works
  local deps=() d i base
  read -ra deps <<< "${DEPLINE[$name]}"
  for (( i=${#deps[@]}-1; i>=0; i-- )); do
    base=${deps[i]##*/}; d=$(norm "${base%%.ko*}")
    [[ -z ${QUEUED[$d]:-} ]] && ADDED_DEPS+=("$d")
    add_module "$d" 0
  done
  LOAD_ORDER+=("$name")
}
for m in "${WANTED_MODULES[@]}"; do add_module "$m" 1; done
[[ -n ${BUILTIN[virtio_net]:-} || -n ${RELPATH[virtio_net]:-} ]] || die "kernel $KVER has no virtio_net"
[[ -n ${BUILTIN[virtio_pci]:-} || -n ${RELPATH[virtio_pci]:-} ]] || die "kernel $KVER has no virtio_pci"

# ---- stamp: everything the image is derived from ------------------------------
stamp_content() {
  echo "format 1"
  echo "script $(sha256sum < "$SELF" | cut -d' ' -f1)"
  echo "kernel $KERNEL $(sha256sum < "$KERNEL" | cut -d' ' -f1)"
  echo "busybox $(sha256sum < "$BUSYBOX" | cut -d' ' -f1)"
  local n
  for n in "${LOAD_ORDER[@]}"; do
    echo "module $n ${RELPATH[$n]} $(sha256sum < "$MODDIR/${RELPATH[$n]}" | cut -d' ' -f1)"
  done
  echo "builtin ${BUILTINS_SEEN[*]:-}"
  echo "absent ${ABSENT[*]:-}"
}
STAMP=$(stamp_content)
up_to_date() {
  [[ -f $OUTDIR/vmlinuz && -f $OUTDIR/initrd.img && -f $OUTDIR/stamp ]] &&
    [[ $(cat "$OUTDIR/stamp") == "$STAMP" ]]
}
up_to_date && exit 0

# Serialize concurrent builders; re-check once we hold the lock.
exec 9>>"$OUTDIR/.lock"
flock 9
up_to_date && exit 0
# Temp dirs are only created under the lock, so any left over are from a killed build.
rm -rf -- "$OUTDIR"/.build.*

T0=$(date +%s%N)
TMP=$(mktemp -d "$OUTDIR/.build.XXXXXX")
trap 'rm -rf -- "$TMP"' EXIT
ROOT=$TMP/root
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,lib/modules}

# busybox + applet symlinks at their canonical locations
cp "$BUSYBOX" "$ROOT/bin/busybox"
chmod 0755 "$ROOT/bin/busybox"
while IFS= read -r applet; do
  [[ $applet == bin/busybox || -e $ROOT/$applet ]] && continue
  [[ $applet == */* ]] && mkdir -p "$ROOT/${applet%/*}"
  ln -s /bin/busybox "$ROOT/$applet"
done < <("$BUSYBOX" --list-full)
[[ -e $ROOT/bin/sh ]] || ln -s /bin/busybox "$ROOT/bin/sh"

# modules (decompressed: busybox insmod needs plain .ko)
: > "$ROOT/etc/tb-modules"
for n in "${LOAD_ORDER[@]}"; do
  src=$MODDIR/${RELPATH[$n]}; dst=$ROOT/lib/modules/$n.ko
  case $src in
    *.ko)     cp "$src" "$dst" ;;
    *.ko.xz)  xz -dc "$src" > "$dst" ;;
    *.ko.zst) zstd -qdc "$src" > "$dst" ;;
    *.ko.gz)  gzip -dc "$src" > "$dst" ;;
    *) die "unknown module format: $src" ;;
  esac
  echo "/lib/modules/$n.ko" >> "$ROOT/etc/tb-modules"
done

cat > "$ROOT/init" <<'EOF'
#!/bin/sh
# tapbroker test guest init. Protocol: see test/guest/README.md.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
# The firmware leaves terminal escape codes without a trailing newline on the
# serial line; start on a fresh line so every marker is a line of its own.
echo

off() {
  poweroff -f
  echo o > /proc/sysrq-trigger 2>/dev/null
  sleep 5
  exit 1   # init exiting panics; with panic=-1 and qemu -no-reboot qemu exits
}
fail() { echo "TB-GUEST-FAIL $*"; off; }
uptime_s() { read -r u _ < /proc/uptime; echo "${u%.*}"; }

[ -r /proc/cmdline ] || fail "cannot mount /proc"
TB_IP= TB_PING= TB_COUNT=3 TB_TIMEOUT=20 TB_MAC2=
for arg in $(cat /proc/cmdline); do
  case $arg in
    tb.ip=*)      TB_IP=${arg#tb.ip=} ;;
    tb.ping=*)    TB_PING=${arg#tb.ping=} ;;
    tb.count=*)   TB_COUNT=${arg#tb.count=} ;;
    tb.timeout=*) TB_TIMEOUT=${arg#tb.timeout=} ;;
    tb.mac2=*)    TB_MAC2=${arg#tb.mac2=} ;;
  esac
done
[ -n "$TB_IP" ] || fail "missing tb.ip"
[ -n "$TB_PING" ] || fail "missing tb.ping"
case $TB_COUNT in ''|*[!0-9]*|0) fail "bad tb.count=$TB_COUNT" ;; esac
case $TB_TIMEOUT in ''|*[!0-9]*|0) fail "bad tb.timeout=$TB_TIMEOUT" ;; esac

while read -r mod; do
  [ -n "$mod" ] || continue
  err=$(insmod "$mod" 2>&1) || fail "insmod ${mod##*/}: $(echo $err)"
done < /etc/tb-modules

i=0
while [ ! -e /sys/class/net/eth0 ]; do
  i=$((i + 1)); [ $i -le 50 ] || fail "no eth0"
  sleep 0.1
done

ip link set lo up || fail "ip link set lo up"
ip addr add "$TB_IP" dev eth0 || fail "ip addr add $TB_IP dev eth0"
ip link set eth0 up || fail "ip link set eth0 up"
echo "TB-GUEST-MAC $(cat /sys/class/net/eth0/address)"

# Success = TB_COUNT echo replies within TB_TIMEOUT seconds; lost probes (bridge
# port / ARP still settling) are retried.
deadline=$(( $(uptime_s) + TB_TIMEOUT ))
ok=0
while [ $ok -lt "$TB_COUNT" ] && [ "$(uptime_s)" -lt $deadline ]; do
  if ping -c 1 -W 1 "$TB_PING" >/dev/null 2>&1; then
    ok=$((ok + 1))
  else
    sleep 0.2
  fi
done
if [ $ok -ge "$TB_COUNT" ]; then
  echo "TB-GUEST-PING-OK $TB_PING"
else
  echo "TB-GUEST-PING-FAIL $TB_PING"
fi

# tb.mac2=MAC: the guest then takes another MAC (a spoofing guest) and pings again, briefly: on a port
# locked to its first MAC nothing it sends gets through.
if [ -n "$TB_MAC2" ]; then
  ip link set eth0 down && ip link set eth0 address "$TB_MAC2" && ip link set eth0 up || fail "set mac $TB_MAC2"
  ip neigh flush dev eth0 2>/dev/null
  echo "TB-GUEST-MAC2 $(cat /sys/class/net/eth0/address)"
  deadline=$(( $(uptime_s) + 6 ))
  ok=0
  while [ $ok -lt 1 ] && [ "$(uptime_s)" -lt $deadline ]; do
    if ping -c 1 -W 1 "$TB_PING" >/dev/null 2>&1; then ok=1; else sleep 0.2; fi
  done
  if [ $ok -ge 1 ]; then echo "TB-GUEST-PING2-OK $TB_PING"; else echo "TB-GUEST-PING2-FAIL $TB_PING"; fi
fi
off
EOF
chmod 0755 "$ROOT/init"

# /dev/console must exist in the initramfs or the kernel starts init without a
# console (and prints a warning). mknod would need root, so emit that entry as a
# hand-written newc archive; the kernel accepts concatenated cpio archives.
newc_entry() { # name mode(octal) rdevmajor rdevminor nlink
  local name=$1 mode=$2 maj=$3 min=$4 nlink=$5 hdr pad
  hdr=$(printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        0 $((8#$mode)) 0 0 "$nlink" 0 0 0 0 "$maj" "$min" $(( ${#name} + 1 )) 0)
  printf '%s%s\0' "$hdr" "$name"
  pad=$(( (4 - (110 + ${#name} + 1) % 4) % 4 ))
  (( pad == 0 )) || head -c "$pad" /dev/zero
}
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}
find "$ROOT" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
{
  newc_entry dev 040755 0 0 2
  newc_entry dev/console 020600 5 1 1
  newc_entry 'TRAILER!!!' 0 0 0 1
  (cd "$ROOT" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
     cpio --null --create --format=newc --owner=0:0 --reproducible --quiet)
} | gzip -9 -n > "$TMP/initrd.img"
cp "$KERNEL" "$TMP/vmlinuz"
printf '%s\n' "$STAMP" > "$TMP/stamp"
chmod 0644 "$TMP/initrd.img" "$TMP/vmlinuz" "$TMP/stamp"

# Atomic replace, stamp last (a crash in between just causes a rebuild).
mv -f -- "$TMP/vmlinuz" "$OUTDIR/vmlinuz"
mv -f -- "$TMP/initrd.img" "$OUTDIR/initrd.img"
mv -f -- "$TMP/stamp" "$OUTDIR/stamp"

T1=$(date +%s%N)
msg="built guest for kernel $KVER in $(( (T1 - T0) / 1000000 )) ms"
msg+="; modules: ${LOAD_ORDER[*]:-none}"
(( ${#BUILTINS_SEEN[@]} )) && msg+="; built-in: ${BUILTINS_SEEN[*]}"
(( ${#ABSENT[@]} )) && warn "modules not present in kernel $KVER (skipped): ${ABSENT[*]}"
(( ${#ADDED_DEPS[@]} )) && msg+="; added deps: ${ADDED_DEPS[*]}"
echo "build-guest: $msg" >&2
