/* The latency reference for bench/run: the least a bridge can do. One TCP client at a time on
 * 127.0.0.1:PORT, the tty opened raw for it, then poll() on both and read/write straight
 * across: no protocol, no buffering, no escaping (6 system calls per round trip). Not a peer;
 * it shows how much of a round trip is the kernel's (loopback TCP, the pty, wake-ups).
 * Usage: relay TTY PORT */
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <termios.h>
#include <unistd.h>

static int put(int fd, const char *p, ssize_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w <= 0)
            return -1;
        p += w;
        n -= w;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 3)
        return 64;
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2])),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 1))
        return 1;
    static char buf[65536];
    for (;;) {
        int c = accept(ls, 0, 0);
        if (c < 0)
            continue;
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        int t = open(argv[1], O_RDWR | O_NOCTTY);
        struct termios tio;
        if (t < 0 || tcgetattr(t, &tio))
            return 1;
        cfmakeraw(&tio);
        tcsetattr(t, TCSANOW, &tio);
        struct pollfd p[2] = {{c, POLLIN, 0}, {t, POLLIN, 0}};
        for (;;) {
            if (poll(p, 2, -1) < 0)
                break;
            if (p[0].revents) {
                ssize_t n = read(c, buf, sizeof buf);
                if (n <= 0 || put(t, buf, n))
                    break;
            }
            if (p[1].revents) {
                ssize_t n = read(t, buf, sizeof buf);
                if (n <= 0 || put(c, buf, n))
                    break;
            }
        }
        close(t);
        close(c);
    }
}
