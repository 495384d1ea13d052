import sys

from jaxtag.cli import main

sys.exit(main())
