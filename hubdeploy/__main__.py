import sys

from hubdeploy.cli import main

sys.exit(main())
