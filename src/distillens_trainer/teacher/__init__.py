"""The frozen teacher: resolved and loaded (:mod:`.loading`), frozen and placed (:mod:`.placement`), or read
from an offline cache (:mod:`.cache`: its format, integrity check, reader and writer; :mod:`.cached`: a cache
opened and checked against a run)."""
