from fixtures_peers import *  # noqa: F403
from fixtures_postgres import *  # noqa: F403
from fixtures_printers import *  # noqa: F403
from fixtures_processes import *  # noqa: F403
from fixtures_relay import *  # noqa: F403
from fixtures_snmp import *  # noqa: F403
