"""`abdoserve gateway`: studies arrive over DICOM, results go back as Structured Reports.

A C-STORE SCP spools every instance before acknowledging it, groups instances into
studies that are complete after a quiet period, routes each series by declarative
rules to a task, sends it through the gRPC client, and stores a DICOM SR (and a JSON
copy) at the configured destinations. See docs/gateway.md.
"""
