"""``python -m crashsim`` runs the command line."""
import sys

from crashsim.cli import main

sys.exit(main())
