"""gcp-storage-emulator as the tests run it, with the one header it leaves out.

Real GCS answers an object download with `x-goog-generation`; tensorstore's OCDBT driver (orbax's
array store) reads the generation from that header and fails with "Malformed StorageGeneration"
without it. This wrapper adds it (and x-goog-metageneration), then runs the emulator's own CLI:

    python tests/gcs_emulator.py -d DIR start --host 127.0.0.1 --port PORT --default-bucket B
"""

from __future__ import annotations

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # noqa: BLE001 - not found: the wrapped handler answered already
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])


# Before the server module builds its routing table from objects.download.
objects.download = _download_with_generation

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
