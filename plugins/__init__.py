"""qcloop.plugins"""
