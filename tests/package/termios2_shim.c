/*
 * Test-only LD_PRELOAD shim for running a dynamically linked esp-bridge under qemu-user.
 *
 * serialport (like any program that sets arbitrary baud rates on Linux) configures the tty
 * with the TCGETS2/TCSETS2 ioctls, which qemu-user does not emulate up to at least QEMU 10.0
 * (it answers ENOSYS, "Function not implemented"; termios2 support for linux-user was still
 * a patch series on qemu-devel in 2026). The kernel's struct termios is the head of struct
 * termios2, so these requests are passed on as TCGETS/TCSETS*, which qemu does emulate, and
 * the speeds are remembered here. That is enough for a pseudo-terminal, which has no real
 * baud rate. Never shipped: scripts/build-debs builds it for the arm64 session check only.
 */
#define _GNU_SOURCE
#include <asm/ioctls.h>
#include <asm/termbits.h>
#include <stdarg.h>
#include <sys/syscall.h>
#include <unistd.h>

static unsigned int ispeed = 115200, ospeed = 115200;

int ioctl(int fd, unsigned long request, ...)
{
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);

    if (request == TCGETS2) {
        struct termios2 *t = arg;
        long r = syscall(SYS_ioctl, fd, TCGETS, t);
        if (r == 0) {
            t->c_ispeed = ispeed;
            t->c_ospeed = ospeed;
        }
        return (int)r;
    }
    if (request == TCSETS2 || request == TCSETSW2 || request == TCSETSF2) {
        struct termios2 t = *(const struct termios2 *)arg;
        unsigned long old = request == TCSETS2 ? TCSETS : request == TCSETSW2 ? TCSETSW : TCSETSF;
        ispeed = t.c_ispeed;
        ospeed = t.c_ospeed;
        /* BOTHER means "the speed is in c_ospeed", which TCSETS cannot carry. */
        t.c_cflag = (t.c_cflag & ~(tcflag_t)CBAUD) | B38400;
        return (int)syscall(SYS_ioctl, fd, old, &t);
    }
    return (int)syscall(SYS_ioctl, fd, request, arg);
}
