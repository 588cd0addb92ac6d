"""runtime.host_malloc: when and how the programs restart themselves with glibc's allocator tunables."""

import os
import subprocess
import sys

from diffusion_jax.runtime import host_malloc

MADVISE = "always [madvise] never\n"
GLIBC = ("glibc", "2.36")


def test_huge_pages_only_with_glibc_235_and_madvise_thp():
    hp = "glibc.malloc.hugetlb=1"
    assert host_malloc.settings({}, GLIBC, MADVISE, cpu=False)["GLIBC_TUNABLES"] == hp
    assert host_malloc.settings({}, GLIBC, "[always] madvise never\n", cpu=False) == {}  # they are there already
    assert host_malloc.settings({}, GLIBC, "always madvise [never]\n", cpu=False) == {}
    assert host_malloc.settings({}, ("glibc", "2.31"), MADVISE, cpu=True) == {}  # no hugetlb tunable before 2.35
    assert host_malloc.settings({}, ("", ""), MADVISE, cpu=True) == {}  # musl, macOS


def test_cpu_only_runs_keep_the_heap_and_dispatch_on_the_calling_thread():
    out = host_malloc.settings({}, GLIBC, MADVISE, cpu=True)
    assert out["GLIBC_TUNABLES"].split(":") == [
        "glibc.malloc.hugetlb=1", "glibc.malloc.mmap_max=0", "glibc.malloc.trim_threshold=4000000000"]
    assert out["JAX_CPU_ENABLE_ASYNC_DISPATCH"] == "false"
    assert "JAX_CPU_ENABLE_ASYNC_DISPATCH" not in host_malloc.settings({}, GLIBC, MADVISE, cpu=False)


def test_the_users_choices_win():
    env = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2", "JAX_CPU_ENABLE_ASYNC_DISPATCH": "1"}
    out = host_malloc.settings(env, GLIBC, MADVISE, cpu=True)
    assert out["GLIBC_TUNABLES"] == ("glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2:"
                                     "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4000000000")
    assert "JAX_CPU_ENABLE_ASYNC_DISPATCH" not in out
    assert host_malloc.settings({host_malloc.OPT_OUT: "1"}, GLIBC, MADVISE, cpu=True) == {}


def test_cpu_only_reads_jax_platforms():
    assert host_malloc.cpu_only({"JAX_PLATFORMS": "cpu"})
    assert not host_malloc.cpu_only({"JAX_PLATFORMS": "cuda,cpu"})


def test_reexec_restarts_the_same_command_line(monkeypatch):
    calls = []
    monkeypatch.setattr(host_malloc, "settings", lambda: {"GLIBC_TUNABLES": "x=1"})
    monkeypatch.setattr(sys, "orig_argv", ["python", "-u", "train.py", "--workdir=w"])
    host_malloc.reexec(execve=lambda *a: calls.append(a))
    (exe, argv, env), = calls
    assert exe == sys.executable and argv == [sys.executable, "-u", "train.py", "--workdir=w"]
    assert env["GLIBC_TUNABLES"] == "x=1"
    monkeypatch.setattr(sys, "orig_argv", ["python", "-c", "pass"])  # nothing to restart
    host_malloc.reexec(execve=lambda *a: calls.append(a))
    assert len(calls) == 1


def test_a_program_restarts_once(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text("import os\nprint('start')\nfrom diffusion_jax.runtime import host_malloc\n"
                      "host_malloc.reexec()\nprint(os.environ.get('GLIBC_TUNABLES', '-'))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_malloc._DONE, host_malloc.OPT_OUT)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    lines = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True,
                           env=env).stdout.split()
    expected = host_malloc.settings(env)
    assert lines.count("start") == (2 if expected else 1)  # restarted at most once
    assert lines[-1] == expected.get("GLIBC_TUNABLES", "-")


def test_dispatch_variable_reaches_jax(tmp_path):
    """JAX reads no variable for its CPU dispatch option: `reexec` applies ours in the restarted process."""
    script = tmp_path / "prog.py"
    script.write_text("from diffusion_jax.runtime import host_malloc\nhost_malloc.reexec()\n"
                      "from jax._src import xla_bridge\nprint(xla_bridge._CPU_ENABLE_ASYNC_DISPATCH.value)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = {k: v for k, v in os.environ.items() if k != host_malloc.ASYNC_DISPATCH}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    base[host_malloc._DONE] = "1"  # as if already restarted: no second exec here
    for value, expected in (("false", "False"), ("true", "True"), (None, "True")):
        env = dict(base, **({host_malloc.ASYNC_DISPATCH: value} if value else {}))
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True, env=env)
        assert out.stdout.split()[-1] == expected, (value, out.stdout, out.stderr[-500:])
    assert host_malloc.apply_dispatch({}) is None
