"""pmss_dist: distributed PMSS fine-tuning on FSDP2."""

import logging


class _KnownNotice(logging.Filter):
    """Drops torchao's notice that it skips its C++ extensions for a torch release it was not
    built against: printed by every process at import, harmless here (the NF4 path is pure
    PyTorch), and nothing a user can act on. Every other torchao message still shows."""

    TEXT = "Skipping import of cpp extensions due to incompatible torch version"

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.TEXT)


# Before anything imports torchao (torchtune does): the filter must be on its logger first.
logging.getLogger("torchao").addFilter(_KnownNotice())
