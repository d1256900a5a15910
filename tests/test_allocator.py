import platform
import sys

import pytest

from apt_viz.allocator import fix_mmap_threshold


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_threshold():
    assert fix_mmap_threshold(1 << 20) is True
