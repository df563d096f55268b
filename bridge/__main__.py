import logging
import os

from .cli import main

code = main()
# Every protocol line is already written (unbuffered, os.write). Skip the
# interpreter's teardown: freeing a large model and the GPU context there
# takes about a second, and a host waiting on ``quit`` should not.
logging.shutdown()
os._exit(code)
