import sys

from .cli import module_main

sys.exit(module_main())
