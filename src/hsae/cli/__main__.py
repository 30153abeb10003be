import sys

from hsae.cli import main

sys.exit(main())
