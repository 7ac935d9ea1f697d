"""`abdoserve bench serving`'s parts: study pools and timing, the compared pipelines, the report."""
