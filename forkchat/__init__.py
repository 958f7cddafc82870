"""forkchat: a two-person TCP chat server that forks one worker process per pair.

Modules, one per role:

- ``cli``        the server's command line (docopt) and ``main``; ``args`` the checks all share
- ``server``     the parent: the selector loop, the signals, the shutdown; it wires:
- ``frontdoor``  accepting, the preamble (``preamble``: ``proxyproto``, ``tlsconf``), HELLO, names
- ``lobby``      the waiting clients, their WAIT, and pairing (``waitlist``: the pure policy)
- ``rooms``      one forked worker per pair: counts, channels, hand-backs, reaping
- ``clients``    the parent's client connections: I/O, graceful close
- ``children``   forking a child and watching it through a pidfd; the signal sets, exit codes
- ``room``       the room worker: relay and turns between the two clients of one pair
- ``handback``   a room's channel to the parent: clients handed back, verdicts, the shutdown note
- ``protocol``   the wire protocol: framing, validation, the lines
- ``conn``       one client connection: non-blocking socket, line reader, bounded output
- ``fdmap``      the parent's fds, for a new room worker to close by number
- ``activation`` systemd socket activation; ``pidfile`` the pidfile
- ``log``        timestamped event lines on stdout; ``proctitle`` process names
- ``client``     the client's command line and ``main``; ``session`` its side of the protocol,
                 ``link`` its connection, ``piped`` and ``terminal`` (prompt_toolkit) its
                 fronts, ``commands`` and ``chatview`` what a person types and sees
- ``launch``     how bin/ starts: under .venv, one line if the requirements are missing
- ``upgrade``    upgrade in place: the check of the new code, the hand-over, the exec;
                 ``shared`` where a room's count lives, to be read again after it
- ``pids``       the psutil-based PID helper; ``pidsfind`` finding the processes
- ``bench``      the benchmark (a package)
"""

__version__ = "1.0.0"
