# Freezes the node app into a MicroPython image (see the MicroPython docs, "MicroPython
# manifest files"): build with FROZEN_MANIFEST=/path/to/firmware/manifest.py. That setting
# replaces the port's own boards/manifest.py (ports/esp32/CMakeLists.txt), which freezes
# _boot.py (it mounts the filesystem) and asyncio: without the include below an image would
# boot with no filesystem and no asyncio. main.py and boot.py stay on the filesystem so that a
# technician can see and replace them.
include("$(PORT_DIR)/boards/manifest.py")
metadata(description="Kinhbac sensor node", version="0.1.0")
module("wire.py", base_path="../kinhbac")
package("node")
