"""qcloop.deploy"""
