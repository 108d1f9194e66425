from fixtures_printers import *  # noqa: F403
