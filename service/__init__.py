"""What both long-running programs (relay and connector) are built on: settings from flags, environment
and files; logging; the HTTP/1.1 server on h11; the ``--metrics-listen`` ops listener; private state on
disk; bounded JSON from the network. Neither program's own code lives here, and the CLI sits on top."""
