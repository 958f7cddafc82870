"""forkchat: a two-person TCP chat server that forks one worker process per pair.

Modules, one per role:

- ``cli``      the server's command line (docopt) and ``main``; ``args`` the checks all share
- ``server``   the parent: listen, accept, names, waiting queue, pairing, reaping, signals
- ``room``     the room worker: relay and turns between the two clients of one pair
- ``protocol`` the wire protocol: framing, validation, the lines
- ``conn``     one client connection: non-blocking socket, line reader, bounded output
- ``fdmap``    the parent's fds, for a new room worker to close by number
- ``log``      timestamped event lines on stdout
- ``client``   the interactive and scripted client; ``lineedit`` its terminal line editor
- ``pids``     the psutil-based PID helper
- ``bench``    the benchmark
"""

__version__ = "1.0.0"
