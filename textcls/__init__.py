"""textcls: train, compress and serve Chinese text classifiers as a service.

This package is the small shared core that ``api``, ``workers`` and ``deploy``
import: settings, database models, the artifact store and the CLI.
"""

__version__ = "0.1.0"
