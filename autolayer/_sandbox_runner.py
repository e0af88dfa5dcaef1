"""The sandbox's program runner: a script for `python -I -S -B` (autolayer imports its constants).

`_sandbox_runner.py WORKDIR LAYERS LIMITS` runs WORKDIR/program.py after entering the OS layers
named in LAYERS (network, pid, drop_user), setting LIMITS (cpu, memory, file size, open files,
processes) and installing an audit hook. Exit 0 means the program ran to its end; 3 means the
hook refused something. `--probe net|pid|user` only tells whether that layer works here.
See `autolayer.sandbox` for the design.
"""

import os
import resource
import sys

CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
PR_SET_PDEATHSIG = 1
NOBODY = 65534
EXIT_REFUSED = 3
REFUSED_EVENTS = {  # PEP 578 audit events the program may never raise
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "subprocess.Popen",
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
    "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "os.chmod", "os.chown",
    "os.symlink", "os.link", "os.setxattr", "sys._current_frames", "sys.setprofile", "sys.settrace",
}  # fmt: skip
PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate"}
BLOCKED_MODULES = {"ctypes", "_ctypes", "socket", "_socket", "subprocess", "multiprocessing"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def unshare(flags):
    import ctypes  # noqa: PLC0415 - loaded only here, then dropped from sys.modules

    libc = ctypes.CDLL(None, use_errno=True)
    if os.geteuid() != 0:
        flags |= CLONE_NEWUSER  # unprivileged: a user namespace makes the others allowed
    ok = libc.unshare(flags) == 0
    del sys.modules["ctypes"]
    return ok


def die_with_parent():
    import ctypes  # noqa: PLC0415

    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, 9)
    del sys.modules["ctypes"]


def set_limits(cpu, memory, file_size, open_files, processes, drop_user):
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if drop_user:  # per-user process count: enforced for nobody, ignored for root
        resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))


def drop_privileges():
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def inside(path, workdir):
    if isinstance(path, int):
        return True  # an already-open descriptor
    if isinstance(path, bytes):
        path = path.decode(errors="replace")
    real = os.path.realpath(os.path.join(workdir, os.fspath(path)))
    return real == workdir or real.startswith(workdir + os.sep) or real == "/dev/null"


def install_hook(workdir):
    def refuse(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    def hook(event, args):
        if event in REFUSED_EVENTS:
            refuse(event)
        elif event == "import" and args[0].split(".")[0] in BLOCKED_MODULES:
            refuse(f"import {args[0]}")
        elif event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                mode is None and flags is not None and flags & WRITE_FLAGS
            )
            if writing and not inside(path, workdir):
                refuse(f"writing {path}")
        elif event in PATH_EVENTS and not all(
            inside(a, workdir) for a in args if isinstance(a, (str, bytes, os.PathLike))
        ):
            refuse(f"{event} outside the working directory")

    sys.addaudithook(hook)


def refused_exit(*args, **kwargs):
    raise PermissionError("sandbox: exiting the interpreter early is not allowed")


def run(workdir):
    with open(os.path.join(workdir, "program.py")) as handle:
        source = handle.read()
    code = compile(source, "program.py", "exec")
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED_MODULES:
            del sys.modules[name]
    install_hook(workdir)
    sys.exit = os._exit = refused_exit  # a program must not "pass" by exiting before its tests
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException as err:  # noqa: BLE001 - every way out but the end is a failure
        refused = isinstance(err, PermissionError) and str(err).startswith("sandbox:")
        sys.stderr.write(f"{type(err).__name__}: {err}\n")
        sys.stderr.flush()
        leave(EXIT_REFUSED if refused else 1)
    sys.stdout.flush()
    leave(0)


_exit = os._exit


def leave(code):
    _exit(code)


def probe(which):
    if which == "user":  # can `nobody` still run Python? (not when it lives under /root)
        drop_privileges()
        import hashlib  # noqa: E401, F401, PLC0415

        _exit(0)
    flag = CLONE_NEWNET if which == "net" else CLONE_NEWPID
    _exit(0 if unshare(flag) else 1)


def main():
    if sys.argv[1] == "--probe":
        probe(sys.argv[2])
    workdir, layers = os.path.realpath(sys.argv[1]), set(filter(None, sys.argv[2].split(",")))
    cpu, memory, file_size, open_files, processes = (int(v) for v in sys.argv[3].split(","))
    flags = (CLONE_NEWNET if "network" in layers else 0) | (CLONE_NEWPID if "pid" in layers else 0)
    if flags and not unshare(flags):
        sys.stderr.write("sandbox: could not enter the namespaces\n")
        _exit(EXIT_REFUSED)
    if "pid" in layers:
        # The first child is PID 1 of the new namespace: when it ends, the kernel kills every
        # process the program started, however it detached them.
        child = os.fork()
        if child:
            _, status = os.waitpid(child, 0)
            if os.WIFSIGNALED(status):
                os.kill(os.getpid(), os.WTERMSIG(status))
            _exit(os.waitstatus_to_exitcode(status))
        die_with_parent()
    set_limits(cpu, memory, file_size, open_files, processes, "drop_user" in layers)
    if "drop_user" in layers:
        drop_privileges()
    run(workdir)


if __name__ == "__main__":
    main()
