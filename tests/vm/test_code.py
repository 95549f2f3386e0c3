"""Code execution contexts on the default Debian image: notebook semantics (state, the last
expression's value, tracebacks, rich output), interrupts and timeouts that keep the
context, bash contexts, output caps, a dead interpreter, a kernel that breaks the protocol."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import pytest

import capsa

pytestmark = pytest.mark.vm

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


@pytest.fixture(scope="module")
async def sb() -> AsyncIterator[capsa.Sandbox]:
    async with await capsa.sandbox().image("debian").build() as sandbox:
        await sandbox.agent(timeout=300)
        yield sandbox


async def test_cells_keep_state_and_give_the_last_value(sb: capsa.Sandbox) -> None:
    async with await sb.code_context("python") as ctx:
        first = await ctx.run("import math\nradius = 2\nprint('area follows')\nmath.pi * radius**2")
        assert first.stdout == "area follows\n"
        assert first.text == repr(3.141592653589793 * 4) and first.error is None
        second = await ctx.run("radius += 1\nradius")  # state kept from the first cell
        assert second.text == "3"
        statement = await ctx.run("y = radius * 2")
        assert statement.result is None and statement.stdout == ""
        assert (await ctx.run("_ + y")).text == "9"  # _ is the last value, as in a REPL
        child = await ctx.run(
            "import subprocess\n_ = subprocess.run(['sh', '-c', 'echo $((6*7)) >&2'])"
        )
        assert child.stderr == "42\n"  # a child process's descriptors are captured too


async def test_errors_carry_the_cells_traceback_and_the_context_goes_on(sb: capsa.Sandbox) -> None:
    async with await sb.code_context() as ctx:
        failed = await ctx.run("def f(n):\n    return 10 // n\n\nvalue = 5\nf(0)")
        assert failed.error is not None and failed.error.name == "ZeroDivisionError"
        assert 'File "<cell>", line 2, in f' in failed.error.traceback
        assert "code_kernel" not in failed.error.traceback  # the kernel's frames are left out
        syntax = await ctx.run("def broken(:")
        assert syntax.error is not None and syntax.error.name == "SyntaxError"
        assert (await ctx.run("value")).text == "5"


async def test_rich_output_and_streaming(sb: capsa.Sandbox) -> None:
    async with await sb.code_context() as ctx:
        encoded = base64.b64encode(PNG).decode()
        cell = (
            "import base64\n"
            "class Picture:\n"
            f"    def _repr_png_(self): return base64.b64decode({encoded!r})\n"
            "    def _repr_html_(self): return '<b>pic</b>'\n"
            "display(Picture(), {'k': [1, 2]})\n"
            "Picture()"
        )
        run = await ctx.run(cell)
        assert run.error is None
        assert base64.b64decode(run.displays[0]["image/png"]) == PNG
        assert run.displays[0]["text/html"] == "<b>pic</b>"
        assert run.displays[1]["text/plain"] == "{'k': [1, 2]}"
        assert run.result is not None and run.result["text/html"] == "<b>pic</b>"
        # Output arrives while the cell runs, in order.
        seen: list[str] = []
        code = "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.3)"
        async for event in ctx.stream(code):
            if event.kind == "stdout":
                seen.append(event.text)
        assert "".join(seen) == "0\n1\n2\n" and len(seen) >= 2


async def test_interrupt_and_timeout_stop_the_cell_not_the_context(sb: capsa.Sandbox) -> None:
    async with await sb.code_context() as ctx:
        await ctx.run("kept = 'still here'")
        running = asyncio.ensure_future(ctx.run("import time\nwhile True:\n    time.sleep(0.05)"))
        await asyncio.sleep(1.0)
        await ctx.interrupt()
        stopped = await asyncio.wait_for(running, 30)
        assert stopped.error is not None and stopped.error.name == "KeyboardInterrupt"
        with pytest.raises(capsa.CapsaTimeout, match="interrupted"):
            await ctx.run("while True:\n    pass", timeout=1.0)
        assert (await ctx.run("kept")).text == "'still here'"
        assert ctx.alive


async def test_bash_contexts_keep_the_shell_state(sb: capsa.Sandbox) -> None:
    async with await sb.code_context("bash") as sh:
        first = await sh.run('cd /tmp && COUNT=41 && f() { echo "f:$1"; }\nfalse')
        assert first.exit_code == 1
        second = await sh.run("COUNT=$((COUNT + 1)); f $COUNT; pwd; ls /no-such-dir")
        assert second.stdout == "f:42\n/tmp\n" and second.exit_code == 2
        assert "No such file" in second.stderr
        quoted = await sh.run("echo 'unterminated")  # stays inside its cell
        assert quoted.exit_code != 0
        stopped = asyncio.ensure_future(sh.run("sleep 600"))
        await asyncio.sleep(1.0)
        await sh.interrupt()
        assert (await asyncio.wait_for(stopped, 30)).exit_code != 0
        assert (await sh.run("echo $COUNT")).stdout == "42\n"


async def test_output_past_the_cap_is_dropped_and_flagged(sb: capsa.Sandbox) -> None:
    async with await sb.code_context() as ctx:
        run = await ctx.run("print('x' * (6 << 20))\nprint('after')")
        assert run.truncated and len(run.stdout) == 4 << 20
        assert (await ctx.run("1 + 1")).text == "2"
        assert not (await ctx.run("print('small')")).truncated


async def test_a_dead_interpreter_says_so_and_restarts(sb: capsa.Sandbox) -> None:
    ctx = await sb.code_context()
    await ctx.run("state = 1")
    with pytest.raises(capsa.CodeContextError, match="exited with status 3"):
        await ctx.run("import os\nos._exit(3)")
    assert not ctx.alive
    with pytest.raises(capsa.CodeContextError, match="restart"):
        await ctx.run("1")
    await ctx.restart()
    fresh = await ctx.run("'state' in globals()")
    assert fresh.text == "False"
    await ctx.close()


async def test_a_kernel_that_breaks_the_protocol_is_dropped(sb: capsa.Sandbox) -> None:
    ctx = await sb.code_context()
    forge = (
        "import gc\n"
        "wire = next(o for o in gc.get_objects() if type(o).__name__ == 'Wire')\n"
        "wire.send('bogus', text='x')"
    )
    with pytest.raises(capsa.AgentProtocolError, match="unknown event 'bogus'"):
        await ctx.run(forge)
    assert not ctx.alive
    with pytest.raises(capsa.CodeContextError):
        await ctx.run("1")


async def test_run_code_is_one_shot(sb: capsa.Sandbox) -> None:
    run = await sb.run_code("sum(range(10))")
    assert run.text == "45"
    shell = await sb.run_code("echo $((2 ** 10))", "bash")
    assert shell.stdout == "1024\n" and shell.exit_code == 0
    with pytest.raises(capsa.InvalidConfig, match="language 'ruby'"):
        await sb.code_context("ruby")


async def test_a_derived_image_with_matplotlib_gives_figures_as_png() -> None:
    builder = capsa.sandbox().packages("python3-matplotlib")
    async with await builder.build() as derived:
        ctx = await derived.code_context()
        code = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('capsa')"
        run = await ctx.run(code, timeout=240)
        assert run.error is None, run.error
        (figure,) = run.displays
        png = base64.b64decode(figure["image/png"])
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
        assert (await ctx.run("len(plt.get_fignums())")).text == "0"  # shown, then closed
