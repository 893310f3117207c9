"""qcloop.qc_modules"""
