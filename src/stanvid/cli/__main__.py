import sys

from stanvid.cli import main

sys.exit(main())
