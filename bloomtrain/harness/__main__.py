import sys

from bloomtrain.harness.cli import main

sys.exit(main())
