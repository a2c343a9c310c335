# Freezes the node app into a MicroPython image (see the MicroPython docs, "MicroPython
# manifest files"): build with FROZEN_MANIFEST=/path/to/firmware/manifest.py. main.py and
# boot.py stay on the filesystem so that a technician can see and replace them.
metadata(description="Kinhbac sensor node", version="0.1.0")
module("wire.py", base_path="../kinhbac")
package("node")
