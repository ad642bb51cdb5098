import sys

from hubdeploy.cli import main

if __name__ == "__main__":  # a spawned child (the engine process) imports this module too
    sys.exit(main())
