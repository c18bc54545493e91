import sys

from napari_stpredict.cli import main

sys.exit(main())
