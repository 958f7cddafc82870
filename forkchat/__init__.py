"""forkchat: a two-person TCP chat server that forks one worker process per pair.

Modules, one per role:

- ``cli``        the server's command line (docopt) and ``main``; ``args`` the checks all share
- ``server``     the parent: the selector loop, shutdown, signals, the SIGUSR2 report
- ``frontdoor``  the parent's accepting: preamble (``proxyproto``, ``tlsconf``), HELLO, names
- ``waitlist``   the waiting queue and the pairing policy (pure)
- ``keeper``     the parent's rooms: open one per pair, reap it, take back hand-backs
- ``workers``    starting a room worker (ordered from the forker, or forked here), its count
- ``forker``     the room forker: a small interpreter of its own that forks the rooms
- ``children``   forking a child and watching it through a pidfd
- ``room``       the room worker: relay and turns between the two clients of one pair
- ``handback``   a client's trip from its room back to the parent (``next``, ``--requeue``)
- ``protocol``   the wire protocol: framing, validation, the lines
- ``conn``       one client connection: non-blocking socket, line reader, bounded output
- ``fdmap``      a process's fds, for a new room worker to close by number
- ``activation`` systemd socket activation; ``pidfile`` the pidfile
- ``log``        timestamped event lines on stdout; ``proctitle`` process names
- ``client``     the client's command line and ``main``; ``session`` its side of the protocol,
                 ``link`` its connection, ``piped`` and ``terminal`` (prompt_toolkit) its
                 fronts, ``commands`` and ``chatview`` what a person types and sees
- ``launch``     how bin/ starts: under .venv, one line if the requirements are missing
- ``pids``       the psutil-based PID helper
- ``bench``      the benchmark (a package)
"""

__version__ = "1.0.0"
