"""Run a command and write its peak RSS in KiB (Linux ru_maxrss) to a file: peak_rss.py RESULT CMD [ARG...].

A child's ru_maxrss also holds the RSS high-water mark of the process it was forked from (Linux carries the old
memory map's peak over at exec), so a child of the benchmark, which holds models by then, would report at least the
benchmark's own peak. This launcher stays a few MiB (run it with python -S: no site packages), so the figure it
reads, RUSAGE_CHILDREN after its only child exits, is that child's own. It exits with the child's exit code.
"""

import resource
import subprocess
import sys


def main(argv: list[str]) -> int:
    result, cmd = argv[0], argv[1:]
    code = subprocess.run(cmd).returncode
    with open(result, "w") as f:
        f.write(f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\n")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
