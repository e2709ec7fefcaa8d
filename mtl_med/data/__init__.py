"""mtl_med.data"""
