"""
Compact JSON: the form of spool headers and every answer.
"""

import json

# Built once: json.dumps with any option other than the defaults builds an
# encoder on every call, and these are called for every request.
compact = json.JSONEncoder(separators=(",", ":")).encode
