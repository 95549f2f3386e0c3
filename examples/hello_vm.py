"""Boot a micro-VM with capsa's default kernel and a busybox shell, run a command on its console."""

import asyncio
import sys
import tempfile
from pathlib import Path

import capsa
from capsa.images.kernel import default_kernel
from capsa.images.shell import MARKER, shell_initramfs


async def main(command: str) -> None:
    kernel = default_kernel()
    with tempfile.TemporaryDirectory() as tmp:
        initrd = shell_initramfs(kernel, Path(tmp) / "shell.cpio")
        boot = capsa.LinuxDirectBoot(kernel.path, initrd)
        async with capsa.vm(boot).console_enabled().timeout(60).build() as vm:
            console = await vm.console()
            await console.wait_for(MARKER)
            print(await console.exec(command), end="")
            await vm.stop(timeout=10)


if __name__ == "__main__":
    asyncio.run(main(" ".join(sys.argv[1:]) or "uname -a"))
