//! Builder-style setters for the public config structs, which all take their settings the same
//! way: `ProducerConfig::default().linger(d).batch_size(n)`.

/// `setters!(Config { field: Type, ... })` gives `Config` a `pub fn field(self, Type) -> Self`
/// per field, setting that field and nothing else.
macro_rules! setters {
    ($config:ty { $($field:ident: $ty:ty),* $(,)? }) => {
        impl $config {
            $(
                pub fn $field(mut self, value: $ty) -> Self {
                    self.$field = value;
                    self
                }
            )*
        }
    };
}
