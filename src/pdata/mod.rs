//! pdata
