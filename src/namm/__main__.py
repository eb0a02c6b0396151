from namm.cli import main
import sys

sys.exit(main())
