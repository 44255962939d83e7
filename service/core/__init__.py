"""The bottom layer under middleware/ and providers/: request info, errors and their one renderer,
keys, the key store and its cache, metrics. It imports only ``config``."""
