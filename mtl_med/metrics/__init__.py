"""mtl_med.metrics"""
