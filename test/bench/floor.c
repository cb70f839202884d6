/*
 * The kernel floor without a runtime: the same kernel steps as Netdev.createTap (floor.ts), from C.
 * Per tap: open /dev/net/tun; TUNSETIFF tap|no_pi|tun_excl|vnet_hdr; TUNSETOWNER; RTM_GETLINK of the
 * new name; IPv6 off (its disable_ipv6 sysctl); one RTM_NEWLINK setting the host MAC, the bridge's MTU, the
 * bridge as master, up, an ifalias and the port's IPv4 settings (rp_filter, drop_unicast_in_l2_multicast,
 * arp_ignore); its ACK. Every tap is kept (its fd open) until the end, so no teardown runs between two creates.
 * Prints {"samples": [ms, ...]} (one per tap after the warm-up) as one JSON line.
 *
 * Usage: floor-c BRIDGE N WARMUP PREFIX
 * Built and run by the benchmark (bench.ts, phase floor) inside its network namespace; never installed.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_link.h>
#include <linux/ip.h>
#include <linux/if_tun.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sockios.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int nl;
static unsigned seq;
static char buf[65536];

static void die(const char *what) {
	fprintf(stderr, "floor-c: %s: %s\n", what, strerror(errno));
	exit(1);
}

static double now_ms(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void attr(struct nlmsghdr *h, unsigned short type, const void *data, unsigned short len) {
	struct rtattr *a = (struct rtattr *)((char *)h + NLMSG_ALIGN(h->nlmsg_len));
	a->rta_type = type;
	a->rta_len = RTA_LENGTH(len);
	memcpy(RTA_DATA(a), data, len);
	h->nlmsg_len = NLMSG_ALIGN(h->nlmsg_len) + RTA_ALIGN(a->rta_len);
}

/* Sends one request and reads until its reply (for a GETLINK: the link; otherwise the ACK). */
static struct nlmsghdr *request(struct nlmsghdr *h) {
	h->nlmsg_seq = ++seq;
	if (send(nl, h, h->nlmsg_len, 0) < 0) die("send");
	for (;;) {
		ssize_t n = recv(nl, buf, sizeof buf, 0);
		if (n < 0) die("recv");
		for (struct nlmsghdr *m = (struct nlmsghdr *)buf; NLMSG_OK(m, (unsigned)n); m = NLMSG_NEXT(m, n)) {
			if (m->nlmsg_seq != seq) continue;
			if (m->nlmsg_type == NLMSG_ERROR) {
				int err = ((struct nlmsgerr *)NLMSG_DATA(m))->error;
				if (err) {
					errno = -err;
					die("rtnetlink");
				}
			}
			return m;
		}
	}
}

int main(int argc, char **argv) {
	if (argc != 5) {
		fprintf(stderr, "usage: floor-c BRIDGE N WARMUP PREFIX\n");
		return 2;
	}
	const char *bridge = argv[1];
	int n = atoi(argv[2]), warmup = atoi(argv[3]);
	const char *prefix = argv[4];
	nl = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
	if (nl < 0) die("socket");
	/* The bridge, looked up once (as the broker keeps a checked bridge). */
	struct ifreq br = {0};
	strncpy(br.ifr_name, bridge, IFNAMSIZ - 1);
	if (ioctl(nl, SIOCGIFINDEX, &br) < 0) die(bridge);
	unsigned master = (unsigned)br.ifr_ifindex;
	if (ioctl(nl, SIOCGIFMTU, &br) < 0) die("SIOCGIFMTU");
	unsigned mtu = (unsigned)br.ifr_mtu;
	int *fds = calloc((size_t)(n + warmup), sizeof(int));
	double *samples = calloc((size_t)n, sizeof(double));
	if (!fds || !samples) die("calloc");
	char req[1024] __attribute__((aligned(NLMSG_ALIGNTO)));
	for (int i = 0; i < n + warmup; i++) {
		char name[IFNAMSIZ];
		snprintf(name, sizeof name, "%s%d", prefix, i);
		double t0 = now_ms();
		int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
		if (fd < 0) die("/dev/net/tun");
		struct ifreq ifr = {0};
		snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
		ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_TUN_EXCL | IFF_VNET_HDR;
		if (ioctl(fd, TUNSETIFF, &ifr) < 0) die("TUNSETIFF");
		if (ioctl(fd, TUNSETOWNER, 0UL) < 0) die("TUNSETOWNER");
		/* RTM_GETLINK by name. */
		memset(req, 0, sizeof req);
		struct nlmsghdr *h = (struct nlmsghdr *)req;
		h->nlmsg_len = NLMSG_LENGTH(sizeof(struct ifinfomsg));
		h->nlmsg_type = RTM_GETLINK;
		h->nlmsg_flags = NLM_F_REQUEST;
		attr(h, IFLA_IFNAME, name, (unsigned short)(strlen(name) + 1));
		struct nlmsghdr *link = request(h);
		int index = ((struct ifinfomsg *)NLMSG_DATA(link))->ifi_index;
		/* IPv6 off on the port, before it is up. */
		char conf[96];
		snprintf(conf, sizeof conf, "/proc/sys/net/ipv6/conf/%s/disable_ipv6", name);
		int sysctl = open(conf, O_WRONLY | O_CLOEXEC);
		if (sysctl < 0 || write(sysctl, "1", 1) != 1) die(conf);
		close(sysctl);
		/* RTM_NEWLINK: host MAC, the bridge's MTU, master, up, ifalias, the port's IPv4 settings; with an ACK. */
		memset(req, 0, sizeof req);
		h->nlmsg_len = NLMSG_LENGTH(sizeof(struct ifinfomsg));
		h->nlmsg_type = RTM_NEWLINK;
		h->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
		struct ifinfomsg *ifi = NLMSG_DATA(h);
		ifi->ifi_index = index;
		ifi->ifi_flags = IFF_UP;
		ifi->ifi_change = IFF_UP;
		unsigned char mac[6] = {0xfe, 0x54, 0x00, (unsigned char)(i >> 16), (unsigned char)(i >> 8), (unsigned char)i};
		char alias[] = "tapbroker lease=0000000000000000 broker=00000000 uid=0 kind=tap ends=fds rule=bench";
		attr(h, IFLA_IFALIAS, alias, (unsigned short)strlen(alias));
		attr(h, IFLA_ADDRESS, mac, sizeof mac);
		attr(h, IFLA_MTU, &mtu, sizeof mtu);
		attr(h, IFLA_MASTER, &master, sizeof master);
		struct u32attr { struct rtattr a; unsigned v; };
		struct { struct rtattr inet, conf; struct u32attr v[3]; } ipv4 = {
			{ sizeof ipv4, AF_INET }, { sizeof ipv4 - sizeof(struct rtattr), IFLA_INET_CONF },
			{ { { 8, IPV4_DEVCONF_RP_FILTER }, 1 }, { { 8, IPV4_DEVCONF_DROP_UNICAST_IN_L2_MULTICAST }, 1 },
			  { { 8, IPV4_DEVCONF_ARP_IGNORE }, 8 } },
		};
		attr(h, IFLA_AF_SPEC, &ipv4, sizeof ipv4);
		request(h);
		double dt = now_ms() - t0;
		fds[i] = fd;
		if (i >= warmup) samples[i - warmup] = dt;
	}
	printf("{\"samples\": [");
	for (int i = 0; i < n; i++) printf("%s%.4f", i ? ", " : "", samples[i]);
	printf("]}\n");
	fflush(stdout);
	/* Teardown off the clock: the kernel deletes each tap with its last fd. */
	for (int i = 0; i < n + warmup; i++) close(fds[i]);
	return 0;
}
