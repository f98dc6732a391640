"""job/proctree.py against a real tree: a grandchild in a session of its own (as each rank runs) is found
by parentage and killed with the rest; the root's exit status stays for the one who started it."""
import signal
import subprocess
import sys
import time

import psutil

from job import proctree

TREE = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
print("up", flush=True)
time.sleep(300)
"""


def test_kill_tree_reaches_a_descendant_in_its_own_session_and_leaves_the_root_status():
    root = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    try:
        assert root.stdout.readline().strip() == "up"
        below = proctree.descendants(root.pid)
        assert len(below) == 1 and below[0].pid != root.pid
        assert proctree.ranks(root.pid) == []  # no job.train.sft here
        assert proctree.kill_tree(root.pid) == 2
        assert root.wait(timeout=10) == -signal.SIGKILL
        deadline = time.time() + 10
        while psutil.pid_exists(below[0].pid) and time.time() < deadline:
            time.sleep(0.05)
        assert not psutil.pid_exists(below[0].pid)
    finally:
        root.kill()
    assert proctree.kill_tree(root.pid) == 0 and proctree.descendants(root.pid) == []
