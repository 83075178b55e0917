/* LD_PRELOAD shim for the benchmark's servers: a pseudo-terminal has no modem lines, so
 * TIOCMGET/TIOCMSET/TIOCMBIS/TIOCMBIC fail there with ENOTTY, and servers then skip their
 * replies to DTR/RTS requests (ser2net) or drop the client (pyserial's PortManager). A UART
 * whose modem lines are not wired accepts those writes and reads its inputs as inactive;
 * this makes a pty do the same for the process it is loaded into, and changes nothing else.
 * Every server in the benchmark runs with it.  Build: cc -O2 -shared -fPIC -o ptymodem.so
 * ptymodem.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <sys/ioctl.h>
#include <termios.h>

static int lines = TIOCM_DTR | TIOCM_RTS; /* as a fresh UART: outputs asserted */

int ioctl(int fd, unsigned long req, ...)
{
    static int (*real)(int, unsigned long, ...);
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (!real)
        real = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
    int r = real(fd, req, arg);
    if (r == -1 && (errno == ENOTTY || errno == EINVAL) &&
        (req == TIOCMGET || req == TIOCMSET || req == TIOCMBIS || req == TIOCMBIC) && arg) {
        int *v = arg;
        switch (req) {
        case TIOCMGET: *v = lines; break;
        case TIOCMSET: lines = *v & (TIOCM_DTR | TIOCM_RTS); break;
        case TIOCMBIS: lines |= *v & (TIOCM_DTR | TIOCM_RTS); break;
        case TIOCMBIC: lines &= ~*v; break;
        }
        errno = 0;
        return 0;
    }
    return r;
}
