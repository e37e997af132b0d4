"""Inspection: ``explain`` (what each attention site became, and why not), the command line and graph dumps."""
