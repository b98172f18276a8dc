import sys

from bloomtrain.launch.cli import main

sys.exit(main())
