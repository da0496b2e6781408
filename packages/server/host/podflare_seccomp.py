#!/usr/bin/python3
"""Writes the sandboxes' seccomp filter (classic BPF, as bubblewrap's `--seccomp FD` takes it) to
the file named by its argument. Built with libseccomp (Debian's python3-seccomp), never hand-written bytecode.

Policy: allow by default (sandboxes run arbitrary Linux software), refuse with EPERM what a sandbox
never needs and what widens the kernel's attack surface. Namespaces already confine most of these
(sandbox root is an unprivileged host uid with capabilities only in its own user namespace); the
filter removes the code paths themselves. Forked children inherit it with their processes.

Syscalls of other architectures (32-bit int 0x80, x32) are killed: libseccomp's filter matches the
native architecture only, and anything else takes the "bad architecture" action.
"""
import errno
import sys

import seccomp

CLONE_NEWUSER = 0x10000000
AF_INET, AF_INET6, AF_PACKET = 2, 10, 17
SOCK_RAW, SOCK_TYPE_MASK = 3, 0xF

# Refused outright, grouped by why.
DENIED = {
    "kernel modules and kexec": ["init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load"],
    "keyrings (not namespaced)": ["add_key", "request_key", "keyctl"],
    "tracing and BPF": ["bpf", "perf_event_open", "lookup_dcookie"],
    "userfaultfd (a classic exploit helper)": ["userfaultfd"],
    "io_uring (large attack surface)": ["io_uring_setup", "io_uring_enter", "io_uring_register"],
    "host clock": ["settimeofday", "clock_settime", "clock_adjtime"],
    "host administration": ["reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog",
                            "vhangup", "nfsservctl", "iopl", "ioperm", "open_by_handle_at", "fanotify_init"],
}


def build() -> seccomp.SyscallFilter:
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    deny = seccomp.ERRNO(errno.EPERM)
    for names in DENIED.values():
        for name in names:
            try:
                f.add_rule(deny, name)
            except (RuntimeError, ValueError):
                pass  # unknown to this libseccomp: the kernel cannot have it either
    # No nested user namespaces: fork children share their sandbox's, and new ones are the usual
    # door into kernel code that needs capabilities.
    f.add_rule(deny, "unshare", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER))
    f.add_rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER))
    # No raw or packet sockets: nothing an agent's code needs, and the tool of spoofing and sniffing
    # (they would only see the sandbox's own network namespace, but the kernel code is reached).
    f.add_rule(deny, "socket", seccomp.Arg(0, seccomp.EQ, AF_PACKET))
    for family in (AF_INET, AF_INET6):
        f.add_rule(deny, "socket", seccomp.Arg(0, seccomp.EQ, family), seccomp.Arg(1, seccomp.MASKED_EQ, SOCK_TYPE_MASK, SOCK_RAW))
    # clone3 passes its flags in memory, out of the filter's sight: answer ENOSYS so that libc
    # falls back to clone(), which is checked above.
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    return f


if __name__ == "__main__":
    with open(sys.argv[1], "wb") as out:
        build().export_bpf(out)
