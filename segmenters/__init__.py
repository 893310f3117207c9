"""qcloop.segmenters"""
